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
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping, Set as AbcSet
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowar.config import FlowARConfig
from flowar.errors import FlowARError
from flowar.pipeline.messages import arity, in_order, in_python_terms, kind_of, takes_three
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
    scaled latent space (``"latent"``). ``seeds`` and ``indices`` name the images (sample
    ``indices[i]`` of ``seed=seeds[i]`` again gives image i). ``timings``: seconds per stage (``ar``, ``head``, ``decode``;
    ``sampling`` instead where CUDA graphs replay whole scales) and ``total``.
    """
    images: Any
    labels: list[int]
    seeds: list[int]
    indices: list[int]
    timings: dict[str, float]
    tokens: Tensor

    def to_tuple(self) -> tuple:
        """``(images,)``, as diffusers' outputs give it (and a call with ``return_dict=False``)."""
        return (self.images,)

    def __getitem__(self, key: int | str):
        """diffusers' ``out[0]`` (the images) and ``out["images"]``."""
        if isinstance(key, str):
            if key not in ("images", "labels", "seeds", "indices", "timings", "tokens"):
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


# what diffusers users pass that FlowAR has otherwise or not at all: the keyword, and what to do instead
_DIFFUSERS_ONLY = {"callback_on_step_end": "callback_on_scale_end=fn(pipe, k, {'tokens': ...}) (FlowAR samples scale by scale)",
                   "callback": "callback_on_scale_end=fn(pipe, k, {'tokens': ...})",
                   "num_images_per_prompt": "repeat the labels, e.g. [3] * 4",
                   "torch_dtype": 'precision="bf16" when opening a checkpoint (an engine directory runs the precision '
                                  "its export chose)",
                   "eta": "leave it out (FlowAR's sampler is an ODE: no noise to scale)",
                   "latents": "seed= or generator= (a seed names an image)",
                   "prompt": 'class_labels: FlowAR makes images of classes (ids or names), e.g. pipe(["cat"])'}
for _k in ("height", "width"):     # (a model makes images of one size: its last token map times its VAE's factor)
    _DIFFUSERS_ONLY[_k] = "leave it out: a FlowAR model makes images of one size (pipe.runtime.image_size: 256 px for FlowAR-S/L/H)"


def _refuse_diffusers_only(where: str, given: dict) -> None:
    if given:
        k = next(iter(given))
        raise FlowARError(f"{where}'s keyword arguments", f"{k!r}, which it does not take",
                          _DIFFUSERS_ONLY.get(k, f"see help(FlowARPipeline.{where})"))


class FlowARPipeline:
    """An opened source (``runtime``) and the diffusers-style call over it."""

    def __init__(self, runtime: Runtime, path: str | None = None):
        self.runtime = runtime
        self.path = path                    # what it was opened from (said by its repr)
        self.progress_bar_config: dict = {}

    def __repr__(self) -> str:
        rt = self.runtime
        what = (f"{rt.kind}, {rt.detail}; {rt.config.num_classes} classes, "
                + (f"{rt.image_size} px images" if rt.decodes else "tokens only (no decoder)")
                + (f", max batch {rt.max_batch}" if rt.max_batch else "") if rt.stages is not None else "closed")
        return f"FlowARPipeline({self.path!r}: {what})" if self.path else f"FlowARPipeline({what})"

    @classmethod
    def from_pretrained(cls, path: str | Path, *, backend: str = "auto", preset: str | None = None,
                        config: str | Path | FlowARConfig | None = None, vae: str | Path | None = None,
                        device: str | None = None, threads: int | None = None, raw_weights: bool = False,
                        cuda_graphs: bool = True, precision: str = "fp32", **others) -> "FlowARPipeline":
        """An engine directory (a folder with ``manifest.json``) or a checkpoint file.

        ``backend`` (engine directories): ``auto`` (TensorRT where usable, else the directory's
        ``--precision auto`` choice, else ONNX Runtime), ``ort``, ``trt``, ``torch``. ``preset`` /
        ``config`` (a config JSON's path, or a :class:`~flowar.config.FlowARConfig`) / ``vae`` /
        ``raw_weights`` / ``precision`` (``bf16``: GEMMs in bf16 with float32 around them): for
        checkpoints (official files carry no config). ``threads``: CPU cores to
        compute on, at most the machine's cores (default: every core this process may use).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise FlowARError("path: an engine directory or a checkpoint file (a str or os.PathLike)", repr(path)[:80],
                              'pass e.g. "out/engines"')
        for name, flag in (("cuda_graphs", cuda_graphs), ("raw_weights", raw_weights)):
            if not isinstance(flag, bool):              # ("no" is a true value)
                raise FlowARError(f"{name} True or False", repr(flag)[:40], f"pass {name}=False or leave it out")
        _refuse_diffusers_only("from_pretrained", others)
        if not str(os.fspath(path)).strip():       # (Path("") is the working directory)
            raise FlowARError("an engine directory or a checkpoint file", "an empty path", 'pass e.g. "out/engines"')
        try:
            os.lstat(path)
        except FileNotFoundError:       # (it said "expected a checkpoint file" of a mistyped engine directory)
            import re
            p = str(os.fspath(path))    # ("facebook/FlowAR-S": a Hub id, where no folder "facebook" is here)
            hub = (re.fullmatch(r"[\w.-]+/[\w.-]+", p) and not Path(p).parent.is_dir()     # ("org/Model-1.5" too)
                   and Path(p).suffix.lower() not in (".pth", ".pt", ".safetensors", ".ckpt", ".bin", ".json", ".onnx"))
            raise FlowARError("an engine directory or a checkpoint file", f"nothing at {p}", "check the path" + (
                f" (a Hugging Face Hub id is not downloaded here: download the checkpoint, e.g. huggingface-cli download "
                f"{p}, and pass the file's path)" if hub else "")) from None
        except (OSError, ValueError):   # (a name too long, a loop of links, a NUL byte: said below)
            pass
        try:                            # (the runtime's messages name the commands' options: here the keywords)
            rt = Runtime.open(os.fspath(path), backend=backend, preset=preset, config=config, vae=vae, device=device,
                              threads=threads, raw_weights=raw_weights, cuda_graphs=cuda_graphs, precision=precision)
            if threads is not None and threads > rt.threads.cores:     # (taken as the cores without a word)
                n = rt.threads.cores
                warnings.warn(f"threads={threads}: this process may use {n} core{'s' * (n != 1)}; it computes on those",
                              stacklevel=2)
            return cls(rt, os.fspath(path))
        except OSError as e:            # (the commands say it in one line too: one_line)
            raise FlowARError("an engine directory or checkpoint this process can read",
                              f"{e.filename or path}: {e.strerror or e}",
                              "check the path and its permissions" if isinstance(e, (PermissionError, FileNotFoundError))
                              or e.errno == errno.ENAMETOOLONG else "check the path and the machine (disk, memory)") from e
        except FlowARError as e:
            raise in_python_terms(e) from None

    def get_label_ids(self, names: str | Sequence[str]) -> list[int]:
        """Class ids from names (ImageNet names and synonyms for the official 1000-class models)."""
        return label_ids([names] if isinstance(names, str) else in_order("names", names, '["cat", "dog"]'),
                         self.runtime.config.num_classes, self.runtime.class_names)

    @property
    def labels(self) -> dict[str, int]:
        """Every class name this model answers to, with its id, sorted by name, as diffusers' DiT
        pipeline has it: each class's display name and synonyms ({} for a model without names). A
        name two classes share (ImageNet's "crane") maps to the last, as there; :meth:`get_label_ids`
        refuses it instead, naming both, as it does names that differ only in case ("Cardigan", the corgi,
        and "cardigan", the sweater: requests match names whatever the case)."""
        names = self.runtime.class_names
        out = {n: i for i, synonyms in enumerate(names.synonyms if names is not None else ()) for n in synonyms}
        return dict(sorted(out.items()))

    @property
    def device(self) -> torch.device:
        """Where the pipeline samples (its engines decide, or ``device`` at :meth:`from_pretrained`)."""
        return self.runtime.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **others) -> "FlowARPipeline":
        """diffusers' ``pipe.to(device)``: this pipeline where it already is; elsewhere refused (an
        engine directory's engines are built for their device, and opening decides it); a dtype too."""
        _refuse_diffusers_only("to", others)          # (torch_dtype= was a TypeError)
        if isinstance(device, torch.dtype) or dtype is not None:
            raise FlowARError("to(device): a pipeline keeps the precision it was opened with", str(dtype or device),
                              _DIFFUSERS_ONLY["torch_dtype"])
        try:
            asked = torch.device(device)
        except (RuntimeError, TypeError):
            raise FlowARError("a device, e.g. \"cpu\" or \"cuda\"", repr(device)[:40], 'pass "cpu" or "cuda"') from None
        if asked.type != self.device.type or asked.index not in (None, self.device.index or 0):   # (cpu:0 is cpu)
            raise FlowARError(f"to({self.device.type!r}): a pipeline samples where it was opened", str(asked),
                              f"open it there: FlowARPipeline.from_pretrained(path, device={str(asked)!r})")
        return self

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

    def __call__(self, class_labels: int | str | Sequence[int | str] | None = None, *,
                 seed: int | Sequence[int] | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, guidance: float | None = None, schedule: str | None = None,
                 solver: str | None = None, stride: int | None = None,
                 batch_size: int | None = None, output_type: str = "pil", indices: Sequence[int] | None = None,
                 callback_on_scale_end: Callable[["FlowARPipeline", int, dict], None] | None = None,
                 return_dict: bool = True, **others) -> FlowAROutput | tuple:
        """Images of ``class_labels`` (ids and/or names).

        Left out: the directory's recorded defaults (``pipe.runtime.defaults``), else 25 steps, cfg 4.3, guidance 0.9.
        ``num_inference_steps``: the official sampler's N (25: the official 24 Euler steps per
        scale; its grid has 2 (N // 2) + 1 points); ``guidance_scale``: cfg at the last scale (1 =
        off); ``guidance``: guide only at t <= this; ``schedule``: ``official`` or ``fast``
        (default: the engine directory's, else official); ``solver`` (euler, ab2, heun, skip) and
        ``stride`` (skip: the head on 1 step in stride), as ``flowar-run --solver/--stride``. Image i has the noise of (``seeds[i]``,
        ``indices[i]``): ``seed`` (one, or one per label; default 0) and ``indices`` (default
        0, 1, ... for one seed; 0 for a seed per image, so that image j is what ``seed[j]`` gives
        alone) name the images, so ``pipe([label], seed=out.seeds[i], indices=[out.indices[i]])``
        gives image i again; a ``generator`` (or one per label) instead draws a seed per image
        from its state, as diffusers' pipelines draw their noise (in ``.seeds``). ``output_type``: pil, np, pt or latent.
        ``callback_on_scale_end(pipe, k, {"tokens": (B, C, s, s), "images": range})`` is called after
        each scale k of each batch (a call larger than the batch runs in batches), with that batch's
        samples (a copy: what it returns is not used, and changing them changes nothing) and their
        places among the call's images. A progress bar is shown, and stays at its end as diffusers'
        do, unless ``set_progress_bar_config(disable=True)`` (or ``leave=False``). ``return_dict=False``: the tuple
        ``(images,)``, as in diffusers.
        """
        try:
            _refuse_diffusers_only("__call__", others)
            if not isinstance(return_dict, bool):         # (as from_pretrained's flags: "no" is a true value)
                raise FlowARError("return_dict True or False", repr(return_dict)[:40], "pass return_dict=False")
            if output_type not in OUTPUT_TYPES:
                raise FlowARError(f"output_type among {', '.join(OUTPUT_TYPES)}", repr(output_type), 'use "pil"')
            if callback_on_scale_end is not None and not takes_three(callback_on_scale_end):
                raise FlowARError("callback_on_scale_end a function of 3 arguments (pipe, k, {'tokens': ...})",
                                  kind_of(callback_on_scale_end) + arity(callback_on_scale_end),
                                  "pass e.g. lambda pipe, k, out: ..., or None")
            if class_labels is None:                      # (a TypeError: a missing positional argument)
                raise FlowARError("class_labels: an id, a name, or a list of them", "none", 'pass e.g. pipe(["cat"])')
            if isinstance(class_labels, torch.Tensor):    # (a DataLoader's y, or y[0]: ids, not floats or bools)
                if class_labels.is_floating_point() or class_labels.dtype == torch.bool or class_labels.ndim > 1:
                    raise FlowARError("class_labels: class ids (int) or class names", f"a {class_labels.dtype} tensor of shape "
                                      f"{tuple(class_labels.shape)}", "pass e.g. [3, 7] or a 1-D int64 tensor")
                class_labels = class_labels.tolist()
            if type(class_labels).__module__ == "numpy" and getattr(class_labels, "ndim", None) == 0:
                class_labels = class_labels.item()          # (a 0-d array, np.array(3): iterating it was a TypeError)
            if type(class_labels).__module__ == "numpy" and getattr(class_labels, "ndim", 0) == 1 \
                    and class_labels.dtype.kind in "iu":        # (as Python ints: NumPy's one by one took 33 s for 10**7)
                class_labels = class_labels.tolist()
            if isinstance(class_labels, (bytes, bytearray)) or not (isinstance(class_labels, (numbers.Integral, str))
                                                                 or hasattr(class_labels, "__iter__")):
                raise FlowARError("class_labels: an id, a name, or a list of them", repr(class_labels)[:60],
                                  'pass e.g. ["cat"] or [3]')
            items = ([class_labels] if isinstance(class_labels, (numbers.Integral, str)) else
                     in_order("class_labels", class_labels, '["cat", "dog"] or [3, 7]'))
            labels = self.get_label_ids(items) if items else []
            if not labels:
                raise FlowARError("at least one class label", "none", 'pass e.g. ["cat"] or [3]')
            if generator is not None and seed is not None:
                raise FlowARError("seed or generator, not both", "both", "pass one of them")
            if generator is not None:                     # its state decides, as in diffusers: a used generator draws anew
                one = not isinstance(generator, (list, tuple))
                gens = [generator] if one else list(generator)
                other = [g for g in gens if not isinstance(g, torch.Generator)]
                if other or not (one or len(gens) == len(labels)):
                    raise FlowARError(f"a torch.Generator, or a list of {len(labels)} (one per image)",
                                      kind_of(generator) if one else f"a list of {len(gens)}" +
                                      (f" holding a {kind_of(other[0])}" if other else ""),
                                      "pass generator=torch.Generator().manual_seed(0)")
                # (drawn on the generator's own device: a CUDA generator cannot draw CPU numbers)
                seeds = [int(s) for g in gens for s in torch.randint(0, 2 ** 63 - 1, (len(labels) if one else 1,),
                                                                    generator=g, device=g.device).tolist()]
            else:                                         # (checked where every source samples: run_sampling)
                seed = seed.tolist() if isinstance(seed, torch.Tensor) or getattr(seed, "ndim", None) == 0 else seed
                if isinstance(seed, (AbcSet, Mapping)):
                    in_order("seed", seed, "seed=[1, 2]")
                one = seed is None or isinstance(seed, numbers.Integral)
                seeds = ([0 if seed is None else seed] * len(labels) if one
                         else list(seed) if hasattr(seed, "__iter__") and not isinstance(seed, (str, bytes)) else seed)
            rt = self.runtime
            # NumPy's numbers as Python's (the settings take int and float, strictly: a bool is not a number)
            # (and a 0-d tensor's: guidance_scale=torch.tensor(4.0) was "not in [1, 50]")
            steps, cfg, guide, batch_size = (int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else
                                             float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
                                             for v in (v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v
                                                       for v in (num_inference_steps, guidance_scale, guidance, batch_size)))
            sched = rt.schedule(Settings(schedule=schedule, steps=steps, cfg=cfg, guidance=guide, solver=solver,
                                         stride=int(stride) if isinstance(stride, numbers.Integral) and
                                         not isinstance(stride, bool) else stride))
            on_scale = None
            if callback_on_scale_end is not None:
                side = rt.config.scales

                def on_scale(tr):
                    B, n, C = tr.z.shape
                    # a copy (the sampler's buffer is written again by the next scale and batch), made outside
                    # inference mode: the callback may change it in place
                    with torch.inference_mode(False):
                        tokens = tr.z.transpose(1, 2).reshape(B, C, side[tr.k], side[tr.k]).clone()
                    callback_on_scale_end(self, tr.k, {"tokens": tokens, "images": range(tr.first, tr.first + B)})
            indices = indices.tolist() if isinstance(indices, torch.Tensor) else indices   # (as seed's: each a 0-d tensor
            if indices is not None and isinstance(indices, (AbcSet, Mapping)):            # was "not an int")
                in_order("indices", indices, "indices=[0, 1]")
            _fits_in_memory(rt, len(labels), output_type)
            timings: dict[str, float] = {}
            # one seed as it is (its samples 0, 1, ...), else a seed per image, drawn or given (each image what its
            # seed gives alone, as generator[j]'s in diffusers): the indices are the runtime's to default
            res = rt.sample(labels, sched, seed=seeds[0] if generator is None and one else seeds, indices=indices,
                            batch_size=batch_size, decode=output_type != "latent",
                            progress={"leave": True} | self.progress_bar_config, on_scale=on_scale, timings=timings)
            images = to_output(res, output_type)
            if not return_dict:
                return (images,)
            return FlowAROutput(images, labels, [int(s) for s in seeds], res.indices, timings, res.tokens)
        except FlowARError as e:              # (the messages name the commands' options: here the keywords)
            raise in_python_terms(e) from None

    def decode(self, latents: Tensor, output_type: str = "pil"):
        """The images of token maps a call returned with ``output_type="latent"`` (B, C, S, S), as
        that call would have made them (diffusers: ``pipe.vae.decode(latents / scaling_factor)``), in
        ``output_type`` pil, np or pt (see :class:`FlowAROutput`)."""
        if output_type not in OUTPUT_TYPES[:3]:
            raise FlowARError(f"output_type among {', '.join(OUTPUT_TYPES[:3])}", repr(output_type), 'use "pil"')
        try:
            return images_as(self.runtime.decode(latents), output_type)
        except FlowARError as e:
            raise in_python_terms(e) from None

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "FlowARPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fits_in_memory(rt: Runtime, n: int, output_type: str) -> None:
    """Refuse, before any work, a call whose images cannot all be held (they are returned at once):
    ``pipe([1] * 10**7)`` grew for days toward terabytes."""
    from flowar.io.memory import available_bytes
    c, side = rt.config, rt.config.scales[-1]
    per = c.latent_channels * side * side * 4 * 2                  # tokens, and their copy in the result
    if output_type != "latent" and rt.image_size:
        per += 3 * rt.image_size ** 2 * (4 + 4)                    # the images, and their output form
    free = available_bytes()
    fits = None if free is None else max(1, free // 2 // per)       # (half: the call computes beside them)
    if fits is not None and n > fits:           # (the same bound as the parts it advises: it took up to all of it)
        raise FlowARError(f"a call whose images fit in memory (about {per / 2**10:.0f} KiB each with their output)",
                          f"{n} images, about {n * per / 2**30:.1f} GiB, with {free / 2**30:.1f} GiB available",
                          f"call it in parts of at most {fits} labels, or write them as they come with flowar-sample")


def to_output(res: SampleResult, output_type: str):
    """The images of a result in the requested form (see :class:`FlowAROutput`)."""
    return res.tokens if output_type == "latent" else images_as(res.images, output_type)


def images_as(images: Tensor, output_type: str):
    """Images in [-1, 1] (B, 3, H, W) as PIL images, (B, H, W, 3) floats in [0, 1] or (B, 3, H, W) ones."""
    from flowar.io.images import to_uint8
    if output_type == "pil":
        from PIL import Image
        return [Image.fromarray(a) for a in to_uint8(images)]
    x = ((images.float().clamp(-1, 1) + 1) / 2)
    return x.permute(0, 2, 3, 1).numpy() if output_type == "np" else x
