"""The commands' messages in the pipeline's terms: a :class:`~flowar.errors.FlowARError` raised by
the code every command shares names their options ("--cfg in [1, 50]"); a pipeline call says its
keywords instead ("guidance_scale in [1, 50]")."""

from __future__ import annotations

import re

from flowar.config import PRESETS
from flowar.errors import FlowARError

# the commands' options a call's messages name, as the call's keywords (longest first)
_KEYWORDS = (("--steps", "num_inference_steps"), ("--cfg", "guidance_scale"), ("--guidance", "guidance"),
             ("--schedule", "schedule"), ("--batch", "batch_size"), ("pass --vae", "pass vae="),
             ("(--save-tokens without --out or --save-images)", '(output_type="latent")'),
             ("--preset/--config/--vae/--raw-weights/--precision", "preset=/config=/vae=/raw_weights=/precision="),
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
