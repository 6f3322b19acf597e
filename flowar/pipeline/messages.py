"""The commands' messages in the pipeline's terms: a :class:`~flowar.errors.FlowARError` raised by
the code every command shares names their options ("--cfg in [1, 50]"); a pipeline call says its
keywords instead ("guidance_scale in [1, 50]"). And the checks of a call's own arguments, with
what their messages say of a value (its kind, a callback's arguments)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Set as AbcSet

from flowar.config import PRESETS
from flowar.errors import FlowARError

# the commands' options a call's messages name, as the call's keywords (longest first)
_KEYWORDS = (("--steps", "num_inference_steps"), ("--cfg", "guidance_scale"), ("--guidance", "guidance"),
             ("--schedule", "schedule"), ("--batch", "batch_size"), ("pass --vae", "pass vae="),
             ("(--save-tokens without --out or --save-images)", '(output_type="latent")'),
             ("--preset/--config", "preset=/config="), ("--raw-weights", "raw_weights"), ("--precision", "precision"),
             ("--preset", "preset"), ("--config", "config"), ("--vae", "vae"), ("--no-cuda-graphs", "cuda_graphs=False"),
             ("--threads", "threads"), ("--device", "device"), ("--backend", "backend"), ("--solver", "solver"),
             ("--stride", "stride"),
             ("--engine-dir", "an engine directory"))
# the word values of the options, as patterns (said quoted, as keyword arguments take them); a path for --vae
_WORDS = {"--preset": "|".join(map(re.escape, PRESETS)), "--backend": "auto|ort|trt|torch", "--schedule": "official|fast", "--solver": "euler|ab2|heun|skip",
          "--precision": "fp32|fp16|bf16|auto", "--device": r"cuda:\d+|cpu|cuda|auto", "--vae": r"/[^\s,;()]+"}
# a command line in a message ("flowar-export --backend trt"): said as it is, a command to run
_COMMAND = re.compile(r"flowar-[a-z]+(?: --[\w-]+(?: (?!--)[^\s,;()]+)?)+")


def in_python_terms(e: FlowARError) -> FlowARError:
    """``e`` with the commands' option names replaced by the pipeline's keywords ("--cfg in [1, 50]"
    -> "guidance_scale in [1, 50]"), except inside the command lines it suggests; in the fix, an
    option with its value as the keyword argument ("--steps 25" -> "num_inference_steps=25")."""
    def say(text: str, values: bool = False) -> str:
        out, at = [], 0
        for m in [*_COMMAND.finditer(text), None]:
            part = text[at:m.start() if m else len(text)]
            for option, keyword in _KEYWORDS:
                # with its value, as the keyword argument: "--preset tiny" -> 'preset="tiny"' (a word that is
                # no value of it stays: "--cfg in [1, 50]")
                if values and option[-1].isalnum():
                    flag = option.split()[-1]                # ("pass --vae": the option --vae)
                    word = _WORDS.get(flag, "(?!)")
                    part = re.sub(rf"{re.escape(option)} (?:(?P<num>-?\d+(?:\.\d+)?)|(?P<word>{word}))(?![\w:/]|\.\d)",
                                  lambda m, k=keyword.split()[-1].rstrip("="), pre=option[:-len(flag)]:
                                  f"{pre}{k}={m['num']}" if m["num"] else f'{pre}{k}="{m["word"]}"', part)
                part = re.sub(re.escape(option) + r"(?![\w-])" if option[-1].isalnum() else re.escape(option), keyword,
                              part)
            out.append(part + (m.group(0) if m else ""))
            at = m.end() if m else at
        return "".join(out)
    try:
        return type(e)(say(e.expected), say(e.got), say(e.fix, True))
    except TypeError:                    # (a subclass that takes more)
        return FlowARError(say(e.expected), say(e.got), say(e.fix, True))


def in_order(name: str, values, example: str) -> list:
    """``values`` as a list, refused where they have no order of their own (a set's order changes
    with Python's string hashing, so which image had which label changed between processes; a
    dict gave its keys) or are not a collection at all."""
    if getattr(values, "ndim", None) == 0:     # (a 0-d array or tensor: one value, as a call takes it)
        values = [values.item()]
    if isinstance(values, (AbcSet, Mapping)) or isinstance(values, (bytes, bytearray)) or \
            not hasattr(values, "__iter__"):
        raise FlowARError(f"{name}: a list, tuple, array or tensor (in the order of the images)", kind_of(values), f"pass e.g. {example}")
    return list(values)


def kind_of(value) -> str:
    """What a value is, for a message: its type's name, with its public module where it is not a
    builtin (``numpy.random.Generator``: "Generator" alone read as torch's)."""
    t = type(value)
    if t.__module__ == "builtins":
        return t.__name__
    return ".".join([m for m in t.__module__.split(".") if not m.startswith("_")] + [t.__qualname__])


def takes_three(fn) -> bool:
    """Whether ``fn`` can be called as ``fn(pipe, k, outputs)`` (checked before any work: a
    one-argument function failed after the first scale had run)."""
    import inspect
    if not callable(fn):
        return False
    try:
        inspect.signature(fn).bind(None, 0, {})
    except TypeError:
        return False
    except ValueError:                   # (a builtin without a signature: called as it is)
        return True
    return True


def arity(fn) -> str:
    """How many arguments ``fn`` takes, for a message ("" where that cannot be said)."""
    import inspect
    try:
        n = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ""
    return f" of {n} argument{'s' * (n != 1)}" + (" (diffusers' step callback: pipe, step, timestep, kwargs)" if n == 4 else "")
