"""``FlowARPipeline``: the one way in, in the diffusers style.

    from flowar import FlowARPipeline
    with FlowARPipeline.from_pretrained("out/engines") as pipe:
        ids = pipe.get_label_ids(["white shark", "umbrella"])
        images = pipe(ids, seed=3, num_inference_steps=25, guidance_scale=4.3).images   # PIL

``from_pretrained`` opens a :class:`~flowar.runtime.runtime.Runtime`: an engine directory (what
``flowar-export`` wrote) on the engines chosen for this machine (TensorRT and CUDA graphs on a GPU
where the plans fit, the measured ``--precision auto`` choice on a CPU, else ONNX Runtime), or a
checkpoint in eager PyTorch. The pipeline holds it as ``pipe.runtime``, as diffusers' pipelines
hold their parts; ``flowar-run``, ``flowar-serve``, ``flowar-sample``, ``flowar-judge`` and the
bench all sample through it, so they run the same engines and give the same images.

A seed names an image: sample i of a call gets the noise of (seed, i), whatever the batch size,
backend, shard or worker (``indices`` renames the samples, for shards of a larger request).
"""

from __future__ import annotations

import errno
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowar.errors import FlowARError
from flowar.runtime.runtime import Runtime
from flowar.sampling.batches import SampleResult
from flowar.sampling.labels import label_ids
from flowar.sampling.schedule import Settings

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(slots=True)
class FlowAROutput:
    """What a pipeline call returns.

    ``images``: a list of PIL images (``"pil"``), a float32 array (B, H, W, 3) in [0, 1] (``"np"``),
    a float32 tensor (B, 3, H, W) in [0, 1] (``"pt"``), or the latent tokens (B, C, S, S) in the
    scaled latent space (``"latent"``). ``seeds`` name the images (sample i of ``seed=seeds[i]``
    again gives image i). ``timings``: seconds per stage (``ar``, ``head``, ``decode``;
    ``sampling`` instead where CUDA graphs replay whole scales) and ``total``.
    """
    images: Any
    labels: list[int]
    seeds: list[int]
    indices: list[int]
    timings: dict[str, float]
    tokens: Tensor


class FlowARPipeline:
    """An opened source (``runtime``) and the diffusers-style call over it."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.progress_bar_config: dict = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, backend: str = "auto", preset: str | None = None,
                        config: str | Path | None = None, vae: str | Path | None = None,
                        device: str | None = None, threads: int | None = None, raw_weights: bool = False,
                        cuda_graphs: bool = True, precision: str = "fp32") -> "FlowARPipeline":
        """An engine directory (a folder with ``manifest.json``) or a checkpoint file.

        ``backend`` (engine directories): ``auto`` (TensorRT where usable, else the directory's
        ``--precision auto`` choice, else ONNX Runtime), ``ort``, ``trt``, ``torch``. ``preset`` /
        ``config`` / ``vae`` / ``raw_weights`` / ``precision`` (``bf16``: GEMMs in bf16 with float32
        around them): for checkpoints (official files carry no config). ``threads``: CPU cores to
        compute on (default: every core this process may use).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise FlowARError("path: an engine directory or a checkpoint file (a str or os.PathLike)", repr(path)[:80],
                              'pass e.g. "out/engines"')
        try:                            # (the runtime's messages name the commands' options: here the keywords)
            return cls(Runtime.open(os.fspath(path), backend=backend, preset=preset, config=config, vae=vae, device=device,
                                    threads=threads, raw_weights=raw_weights, cuda_graphs=cuda_graphs,
                                    precision=precision))
        except OSError as e:            # (the commands say it in one line too: one_line)
            raise FlowARError("an engine directory or checkpoint this process can read",
                              f"{e.filename or path}: {e.strerror or e}",
                              "check the path and its permissions" if isinstance(e, (PermissionError, FileNotFoundError))
                              or e.errno == errno.ENAMETOOLONG else "check the path and the machine (disk, memory)") from e
        except FlowARError as e:
            raise in_python_terms(e) from None

    def get_label_ids(self, names: str | Sequence[str]) -> list[int]:
        """Class ids from names (ImageNet names and synonyms for the official 1000-class models)."""
        return label_ids([names] if isinstance(names, str) else list(names), self.runtime.config.num_classes,
                         self.runtime.class_names)

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options of the progress bar a call shows (``disable=True`` switches it off); checked
        here (an unknown one failed later, in a call, and only on a terminal)."""
        import inspect

        from tqdm import tqdm
        unknown = sorted(set(kwargs) - set(inspect.signature(tqdm.__init__).parameters) - {"self", "kwargs"})
        if unknown:
            raise FlowARError("tqdm's options (e.g. disable=True, desc=..., leave=False)", ", ".join(unknown),
                              "see tqdm's keywords, or pass disable=True")
        self.progress_bar_config = dict(kwargs)

    def __reduce__(self):
        raise FlowARError("a pipeline opened in each process (its engines and buffers do not travel)",
                          "a pickle or copy of an opened one",
                          "send the path and call FlowARPipeline.from_pretrained(path) there")

    def __call__(self, class_labels: int | str | Sequence[int | str], *, seed: int | Sequence[int] | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, guidance: float | None = None, schedule: str | None = None,
                 batch_size: int | None = None, output_type: str = "pil", indices: Sequence[int] | None = None,
                 callback_on_scale_end: Callable[["FlowARPipeline", int, dict], None] | None = None
                 ) -> FlowAROutput:
        """Images of ``class_labels`` (ids and/or names).

        ``num_inference_steps``: the official sampler's N (25: the official 24 Euler steps per
        scale; its grid has 2 (N // 2) + 1 points); ``guidance_scale``: cfg at the last scale (1 =
        off); ``guidance``: guide only at t <= this; ``schedule``: ``official`` or ``fast``
        (default: the engine directory's, else official). Image i has the noise of (``seeds[i]``,
        ``indices[i]``): ``seed`` (one, or one per label; default 0) and ``indices`` (default
        0, 1, ...) name the images, so ``pipe([label], seed=out.seeds[i], indices=[out.indices[i]])``
        gives image i again; a ``generator`` (or one per label) instead draws one seed per image
        from its state, as diffusers' pipelines draw their noise (the drawn seeds are in
        ``.seeds``). ``output_type``: pil, np, pt or latent.
        ``callback_on_scale_end(pipe, k, {"tokens": (B, C, s, s)})`` is called after each scale k
        of each batch (a call larger than the batch runs in batches), with that batch's samples. A
        progress bar is shown unless ``set_progress_bar_config(disable=True)``.
        """
        try:
            if output_type not in OUTPUT_TYPES:
                raise FlowARError(f"output_type among {', '.join(OUTPUT_TYPES)}", repr(output_type), 'use "pil"')
            if callback_on_scale_end is not None and not callable(callback_on_scale_end):
                raise FlowARError("callback_on_scale_end a function (pipe, k, {'tokens': ...})",
                                  type(callback_on_scale_end).__name__, "pass a function, or None")
            if isinstance(class_labels, torch.Tensor):    # (a DataLoader's y, or y[0]: ids, not floats or bools)
                if class_labels.is_floating_point() or class_labels.dtype == torch.bool or class_labels.ndim > 1:
                    raise FlowARError("class_labels: class ids (int) or class names", f"a {class_labels.dtype} tensor of shape "
                                      f"{tuple(class_labels.shape)}", "pass e.g. [3, 7] or a 1-D int64 tensor")
                class_labels = class_labels.tolist()
            if isinstance(class_labels, (bytes, bytearray)) or not (isinstance(class_labels, (numbers.Integral, str))
                                                                 or hasattr(class_labels, "__iter__")):
                raise FlowARError("class_labels: an id, a name, or a list of them", repr(class_labels)[:60],
                                  'pass e.g. ["cat"] or [3]')
            items = [class_labels] if isinstance(class_labels, (numbers.Integral, str)) else list(class_labels)
            labels = self.get_label_ids(items) if items else []
            if not labels:
                raise FlowARError("at least one class label", "none", 'pass e.g. ["cat"] or [3]')
            if generator is not None and seed is not None:
                raise FlowARError("seed or generator, not both", "both", "pass one of them")
            if generator is not None:                     # its state decides, as in diffusers: a used generator draws anew
                one = not isinstance(generator, (list, tuple))
                gens = [generator] if one else list(generator)
                if not all(isinstance(g, torch.Generator) for g in gens) or not (one or len(gens) == len(labels)):
                    raise FlowARError(f"a torch.Generator, or a list of {len(labels)} (one per image)",
                                      type(generator).__name__ if one else f"a list of {len(gens)}",
                                      "pass generator=torch.Generator().manual_seed(0)")
                # (drawn on the generator's own device: a CUDA generator cannot draw CPU numbers)
                seeds = [int(s) for g in gens for s in torch.randint(0, 2 ** 63 - 1, (len(labels) if one else 1,),
                                                                    generator=g, device=g.device).tolist()]
                if not one and indices is None:           # (as in diffusers: image j is what generator[j] alone
                    indices = [0] * len(labels)           # gives, wherever it stands in the list)
            else:                                         # (checked where every source samples: run_sampling)
                seed = seed.tolist() if isinstance(seed, torch.Tensor) else seed
                seeds = ([0 if seed is None else seed] * len(labels) if seed is None or isinstance(seed, numbers.Integral)
                         else list(seed) if hasattr(seed, "__iter__") and not isinstance(seed, (str, bytes)) else seed)
            rt = self.runtime
            # NumPy's numbers as Python's (the settings take int and float, strictly: a bool is not a number)
            steps, cfg, guide, batch_size = (int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else
                                             float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
                                             for v in (num_inference_steps, guidance_scale, guidance, batch_size))
            sched = rt.schedule(Settings(schedule=schedule, steps=steps, cfg=cfg, guidance=guide))
            on_scale = None
            if callback_on_scale_end is not None:
                side = rt.config.scales

                def on_scale(tr):
                    B, n, C = tr.z.shape
                    # a copy: the sampler's buffer is written again by the next scale and batch
                    callback_on_scale_end(self, tr.k, {"tokens": tr.z.transpose(1, 2).reshape(B, C, side[tr.k], side[tr.k])
                                                       .clone()})
            timings: dict[str, float] = {}
            res = rt.sample(labels, sched, seed=seeds, indices=indices, batch_size=batch_size,
                            decode=output_type != "latent", progress=self.progress_bar_config or True, on_scale=on_scale,
                            timings=timings)
            return FlowAROutput(to_output(res, output_type), labels, [int(s) for s in seeds], res.indices, timings,
                                res.tokens)
        except FlowARError as e:              # (the messages name the commands' options: here the keywords)
            raise in_python_terms(e) from None

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "FlowARPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# the commands' options a call's messages name, as the call's keywords
_KEYWORDS = (("--steps", "num_inference_steps"), ("--cfg", "guidance_scale"), ("--guidance", "guidance"),
             ("--schedule", "schedule"), ("--batch", "batch_size"), ("pass --vae", "pass vae="),
             ("(--save-tokens)", '(output_type="latent")'),
             ("--preset/--config/--vae/--raw-weights/--precision", "preset=/config=/vae=/raw_weights=/precision="),
             ("--threads", "threads"), ("--device", "device"), ("--backend", "backend"),
             ("--engine-dir", "an engine directory"))


def in_python_terms(e: FlowARError) -> FlowARError:
    """``e`` with the commands' option names replaced by the pipeline's keywords ("--cfg in [1, 50]"
    -> "guidance_scale in [1, 50]")."""
    def say(text: str) -> str:
        for option, keyword in _KEYWORDS:
            text = re.sub(re.escape(option) + r"(?![\w-])" if option[-1].isalnum() else re.escape(option), keyword, text)
        return text
    try:
        return type(e)(say(e.expected), say(e.got), say(e.fix))
    except TypeError:                    # (a subclass that takes more)
        return FlowARError(say(e.expected), say(e.got), say(e.fix))


def to_output(res: SampleResult, output_type: str):
    """The images of a result in the requested form (see :class:`FlowAROutput`)."""
    if output_type == "latent":
        return res.tokens
    from flowar.io.images import to_uint8
    if output_type == "pil":
        from PIL import Image
        return [Image.fromarray(a) for a in to_uint8(res.images)]
    x = ((res.images.float().clamp(-1, 1) + 1) / 2)
    return x.permute(0, 2, 3, 1).numpy() if output_type == "np" else x
