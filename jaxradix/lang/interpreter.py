"""ProgramState: the text, variables and chat messages of one running program, and its executor.

`s += expr` queues the expression on the state's own worker and returns at once; reading a result
(`s["name"]`, `s.text()`) waits for the queue to drain. So a loop that appends `gen` to each fork
of `s.fork(n)` runs the forks in parallel, while control flow in plain Python sees every value it
reads.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from jaxradix.lang.backends import Backend
from jaxradix.lang.choices import choose
from jaxradix.lang.ir import CachePrefix, Expr, ExprList, Gen, RoleBegin, RoleEnd, Select


class VariableNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class _SerialWorker:
    """Runs submitted items one at a time, in order, on a thread that lives only while there is work."""

    def __init__(self, fn: Callable[[Any], None]) -> None:
        self._fn = fn
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._running = False

    def submit(self, item: Any) -> None:
        with self._lock:
            self._queue.append(item)
            self._idle.clear()
            if not self._running:
                self._running = True
                threading.Thread(target=self._loop, name="jaxradix-lang", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    self._idle.set()
                    return
                item = self._queue.popleft()
            self._fn(item)

    def wait(self) -> None:
        self._idle.wait()


class ProgramState:
    def __init__(self, backend: Backend, defaults: dict[str, Any] | None = None, *, stream: bool = False,
                 parent: ProgramState | None = None) -> None:
        self.backend = backend
        self.ret_value: Any = None
        self._defaults = dict(defaults or {})
        self._stream = stream
        self._text = ""
        self._vars: dict[str, Any] = {}
        self._meta: dict[str, Any] = {}
        self._messages: list[dict[str, str]] = []
        self._role: str | None = None
        self._role_begin = 0
        self._sent = 0  # text[:_sent] went to the backend (as a prompt or as its output): its KV is cached
        self._fork_start = 0
        self._fork_vars: frozenset[str] = frozenset()
        self._error: BaseException | None = None
        self._worker = _SerialWorker(self._run)
        self._cond = threading.Condition()
        self._chunks: list[tuple[str, str | None]] = []  # (text, variable name or None), for text_iter
        self._finished = False
        self._root: ProgramState = self if parent is None else parent._root
        # root only
        self._program_thread: threading.Thread | None = None
        self._done = threading.Event()
        self._first_call_hook: Callable[[str], None] | None = None
        self._descendants: list[ProgramState] = []

    # == building the program ======================================================================
    def __iadd__(self, other: str | Expr) -> ProgramState:
        if not isinstance(other, str | Expr):
            raise TypeError(f"cannot append {type(other).__name__} to a program: use a str or an expression")
        self._worker.submit(other)
        return self

    def _role_block(self, role: str, expr: str | Expr | None) -> Any:
        if expr is not None:
            self._worker.submit(ExprList.of(RoleBegin(role), expr, RoleEnd(role)))
            return None

        @contextmanager
        def block() -> Iterator[None]:
            self._worker.submit(RoleBegin(role))
            yield
            self._worker.submit(RoleEnd(role))

        return block()

    def system(self, expr: str | Expr | None = None) -> AbstractContextManager[None] | None:
        """`s.system("...")` appends a system block; `with s.system(): ...` wraps what is appended inside."""
        return self._role_block("system", expr)

    def user(self, expr: str | Expr | None = None) -> AbstractContextManager[None] | None:
        return self._role_block("user", expr)

    def assistant(self, expr: str | Expr | None = None) -> AbstractContextManager[None] | None:
        return self._role_block("assistant", expr)

    def fork(self, n: int = 1) -> ProgramStateGroup:
        """n copies of this state. With n > 1 the text so far is sent first (max_new_tokens=0), so every
        branch finds it in the radix cache: the prefix is computed once and its pages are shared."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"fork: n must be a positive integer, got {n!r}")
        if n > 1:
            self._worker.submit(CachePrefix())
        self.sync()
        return ProgramStateGroup([self._child() for _ in range(n)], self)

    def _child(self) -> ProgramState:
        c = ProgramState(self.backend, self._defaults, stream=self._stream, parent=self)
        c._text, c._sent, c._fork_start = self._text, self._sent, len(self._text)
        c._vars, c._meta = dict(self._vars), dict(self._meta)
        c._fork_vars = frozenset(self._vars)
        c._messages = [dict(m) for m in self._messages]
        c._role, c._role_begin = self._role, self._role_begin
        with self._root._cond:
            self._root._descendants.append(c)
        return c

    # == reading results ===========================================================================
    def sync(self) -> None:
        """Wait until everything appended so far has run; raise the error of a failed step."""
        root = self._root
        if root._program_thread is not None and threading.current_thread() is not root._program_thread:
            root._done.wait()  # read from outside a streaming program: wait for its end
        self._worker.wait()
        if self._error is not None:
            raise self._error

    def text(self) -> str:
        self.sync()
        return self._text

    def messages(self) -> list[dict[str, str]]:
        self.sync()
        return [dict(m) for m in self._messages]

    def _lookup(self, table: dict[str, Any], name: str) -> Any:
        self.sync()
        if name not in table:
            raise VariableNotFound(f"variable {name!r} is not defined in this program "
                                   f"(defined: {sorted(self._vars)})")
        return table[name]

    def get_var(self, name: str) -> Any:
        return self._lookup(self._vars, name)

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """The backend's meta_info of the gen/select that set `name` (prompt_tokens, cached_tokens, ...);
        after join() of forks, a list with one per branch."""
        return self._lookup(self._meta, name)

    def set_var(self, name: str, value: Any) -> None:
        self.sync()
        self._vars[name] = value

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self._vars

    def error(self) -> BaseException | None:
        self._worker.wait()
        return self._error

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text as it is produced (all of it, or only what `var_name`'s gen writes). With
        run(stream=True) gen text arrives token by token; otherwise a gen's text arrives whole."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._chunks) and not self._finished:
                    self._cond.wait()
                new, i, finished = self._chunks[i:], len(self._chunks), self._finished
            for text, var in new:
                if var_name is None or var == var_name:
                    yield text
            if finished and not new:
                break
        if self._error is not None:
            raise self._error

    def __repr__(self) -> str:
        return f"ProgramState({self._text!r})"

    # == run bookkeeping ===========================================================================
    def _finish(self) -> None:
        """The program ended: every state of it stops streaming."""
        with self._cond:
            states = [self, *self._descendants]
        for st in states:
            st._worker.wait()
            with st._cond:
                st._finished = True
                st._cond.notify_all()
        self._done.set()

    def _before_call(self) -> None:
        root = self._root
        with root._cond:
            hook, root._first_call_hook = root._first_call_hook, None
        if hook is not None:
            hook(self._text)

    # == execution (on the worker) =================================================================
    def _run(self, expr: str | Expr) -> None:
        if self._error is not None:
            return
        try:
            self._execute(expr)
        except BaseException as e:  # noqa: BLE001 - raised to the program at its next read
            self._error = e

    def _execute(self, expr: str | Expr) -> None:
        if isinstance(expr, str):
            self._fill(expr)
        elif isinstance(expr, ExprList):
            for x in expr.items:
                self._execute(x)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, RoleBegin):
            self._role_begin_(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end_(expr.role)
        elif isinstance(expr, CachePrefix):
            if self._text and self._sent < len(self._text):
                self._before_call()
                self.backend.cache_prefix(self._text)
                self._sent = len(self._text)
        else:
            raise TypeError(f"unknown expression {expr!r}")

    def _fill(self, text: str, var: str | None = None) -> None:
        if not text:
            return
        with self._cond:
            self._text += text
            self._chunks.append((text, var))
            self._cond.notify_all()

    def _set(self, name: str | None, value: Any, meta: Any) -> None:
        if name is not None:
            self._vars[name] = value
            self._meta[name] = meta

    def _gen(self, expr: Gen) -> None:
        params = {**self._defaults, **expr.sampling.to_engine()}
        lp = {"return_logprob": expr.return_logprob, "top_logprobs_num": expr.top_logprobs_num}
        self._before_call()
        prompt = self._text
        if self._stream:
            value, meta = "", {}
            for out in self.backend.generate_stream(prompt, params, **lp):
                delta = out["text"][len(value):]
                value, meta = out["text"], out["meta_info"]
                self._fill(delta, expr.name)
        else:
            out = self.backend.generate(prompt, params, **lp)
            value, meta = out["text"], out["meta_info"]
            self._fill(value, expr.name)
        self._set(expr.name, value, meta)
        self._sent = len(self._text)

    def _select(self, expr: Select) -> None:
        self._before_call()
        d = choose(self.backend, self._text, expr.choices)
        self._fill(d.choice, expr.name)
        self._set(expr.name, d.choice, d.meta_info())
        self._sent = len(self._text)

    def _role_begin_(self, role: str) -> None:
        if self._role is not None:
            raise ValueError(f"role blocks do not nest: {role!r} begins inside {self._role!r}")
        tpl = self.backend.chat_template
        if role != "system" and not self._text and not self._messages and tpl.default_system:
            self._fill(tpl.default_system)
            if tpl.default_system_content is not None:
                self._messages.append({"role": "system", "content": tpl.default_system_content})
        self._fill(tpl.role_prefix(role))
        self._role, self._role_begin = role, len(self._text)

    def _role_end_(self, role: str) -> None:
        if self._role != role:
            raise ValueError(f"role block {role!r} ends but {self._role!r} is open")
        content = self._text[self._role_begin:]
        self._fill(self.backend.chat_template.role_suffix(role))
        self._messages.append({"role": role, "content": content})
        self._role = None


class ProgramStateGroup:
    """The branches of s.fork(n). `forks += expr` appends to each branch (a callable gets the
    branch index, a list gives one item per branch); join() gathers the branches' results."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states = states
        self.parent = parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ProgramStateGroup:
        if isinstance(other, str | Expr):
            for st in self.states:
                st += other
        elif isinstance(other, list | tuple):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} items for {len(self.states)} forks")
            for st, x in zip(self.states, other, strict=True):
                st += x
        elif callable(other):
            for i, st in enumerate(self.states):
                st += other(i)
        else:
            raise TypeError(f"cannot append {type(other).__name__} to forks")
        return self

    def sync(self) -> None:
        for st in self.states:
            st.sync()

    def join(self, mode: str = "gather_variable") -> None:
        """gather_variable: every variable a branch defined becomes, in the parent, the list of the
        branches' values (meta_info likewise). concate_and_append: the branches' new text is appended
        to the parent in branch order."""
        self.sync()
        p = self.parent
        p.sync()
        if mode == "gather_variable":
            names = dict.fromkeys(k for st in self.states for k in st._vars if k not in st._fork_vars)
            for k in names:
                p._vars[k] = [st._vars.get(k) for st in self.states]
                p._meta[k] = [st._meta.get(k) for st in self.states]
        elif mode == "concate_and_append":
            p += "".join(st._text[st._fork_start:] for st in self.states)
            p.sync()
        else:
            raise ValueError(f"join: unknown mode {mode!r} (gather_variable or concate_and_append)")
        for st in self.states:
            with st._cond:
                st._finished = True
                st._cond.notify_all()
