"""The frontend language: structured generation programs in plain Python (SGLang's frontend).

    from jaxradix.lang import function, gen, select, user, assistant, set_default_backend, EngineBackend

    @function
    def qa(s, question):
        s += user(question)
        s += assistant(gen("answer", max_tokens=64))

    set_default_backend(engine)   # an Engine, Runtime(model_path=...), or RuntimeEndpoint("http://127.0.0.1:30000")
    print(qa.run(question="...", temperature=0)["answer"])
"""

from jaxradix.lang.api import (
    Function,
    assistant,
    assistant_begin,
    assistant_end,
    fork,
    function,
    gen,
    get_default_backend,
    select,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from jaxradix.lang.backends import Backend, BackendError, EngineBackend, RuntimeEndpoint, connect
from jaxradix.lang.chat_template import ChatTemplate
from jaxradix.lang.choices import ChoiceDecision
from jaxradix.lang.interpreter import ProgramState, ProgramStateGroup, VariableNotFound
from jaxradix.lang.runtime import Runtime

__all__ = [
    "Backend", "BackendError", "ChatTemplate", "ChoiceDecision", "EngineBackend", "Function", "ProgramState",
    "ProgramStateGroup", "Runtime", "RuntimeEndpoint", "VariableNotFound", "assistant", "assistant_begin",
    "assistant_end",
    "connect", "fork", "function", "gen", "get_default_backend", "select", "set_default_backend", "system",
    "system_begin", "system_end", "user", "user_begin", "user_end",
]
