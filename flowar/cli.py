"""Command-line entry points: a thin click layer over typed functions.

A user error prints one line (``error: expected ...; got ...; Fix: ...``) and exits with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from flowar.errors import FlowARError

EXIT_USER_ERROR = 2
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def user_errors(fn):
    """Turn FlowARError (and unwritable paths) into one line and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except FlowARError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as e:         # what the checks before the work could not foresee (disk full, ...)
            if debug:
                raise
            click.echo(f"error: expected paths this command can read and write; got {e.filename or ''}: "
                       f"{e.strerror or e}. Fix: check the path, its permissions and the free disk space", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FlowARError("a CUDA device for --device cuda", "no CUDA device visible to PyTorch",
                          "use --device cpu (or auto)")
    return torch.device(name)


@click.command(context_settings=CONTEXT)
@click.option("--ckpt", type=click.Path(dir_okay=False), help="FlowAR checkpoint (eager PyTorch): official .pth, "
              "training checkpoint, or this project's .safetensors.")
@click.option("--engine-dir", type=click.Path(file_okay=False), help="Engine directory from flowar-export.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "ort", "trt", "torch"]),
              help="With --engine-dir: auto = TensorRT when a GPU and plans are there, else ONNX Runtime.")
@click.option("--preset", help="Config preset for files that carry none: flowar-s, flowar-l, flowar-h, tiny.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config JSON for files that carry none.")
@click.option("--raw-weights", is_flag=True, help="Use 'model' instead of the EMA weights of a training checkpoint.")
@click.option("--vae", type=click.Path(), help="VAE: MAR kl16.ckpt or a diffusers folder (--ckpt path; engine "
              "directories carry their decoder).")
@click.option("--labels", help="Comma-separated class ids, e.g. 3,7 (default: the first 10 classes).")
@click.option("--classes", help="Comma-separated class names, for models that store them, e.g. cat,dog.")
@click.option("--n-per-class", default=1, show_default=True, type=int, help="Samples per requested class.")
@click.option("--batch", "batch_size", type=int, help="Samples per batch [default: all at once; with --engine-dir "
              "the directory's max batch].")
@click.option("--steps", type=int, help="Euler steps per scale (25 = official grid, 24 steps) [default: 25, or the "
              "engine directory's].")
@click.option("--cfg", type=float, help="Guidance weight at the last scale, 1 = off [default: 4.3, or the directory's].")
@click.option("--guidance", type=float, help="Guide only steps with t <= this [default: 0.9, or the directory's].")
@click.option("--seed", default=0, show_default=True, type=int, help="Names the images: sample i's noise depends "
              "only on (seed, i), whatever the batch size or backend.")
@click.option("--noise", "noise_file", type=click.Path(dir_okay=False), help="safetensors with noise0..noise{n-1} "
              "to replay instead (the official layout: (2B, s^2, C) per scale for all requested samples).")
@click.option("--save-tokens", type=click.Path(dir_okay=False), help="Write tokens (B,C,H,W) to this safetensors file.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write a labelled PNG grid here.")
@click.option("--save-images", type=click.Path(file_okay=False), help="Write one PNG per sample into this folder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] (--ckpt path).")
@click.option("--threads", type=int, help="CPU cores to compute on [default: every core this process may use].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def run(ckpt, engine_dir, backend, preset, config_path, raw_weights, vae, labels, classes, n_per_class, batch_size,
        steps, cfg, guidance, seed, noise_file, save_tokens, out, save_images, device, threads, debug):
    """Sample images from a FlowAR checkpoint (eager PyTorch) or an engine directory (runtime)."""
    from flowar.outputs import check_writable
    from flowar.run import parse_labels, run_sampling, write_outputs
    from flowar.schedule import validate_sampling_args
    if bool(ckpt) == bool(engine_dir):
        raise FlowARError("exactly one of --ckpt or --engine-dir", "both" if ckpt else "neither",
                          "pass --engine-dir DIR (from flowar-export) or --ckpt PATH")
    if engine_dir and (preset or config_path or vae or raw_weights):
        raise FlowARError("no --preset/--config/--vae/--raw-weights with --engine-dir", "some of them",
                          "the engine directory records its config and decoder; drop those options")
    if threads is not None and threads < 1:
        raise FlowARError("--threads >= 1", str(threads), "use e.g. --threads 2, or omit it to use every core")
    for p, is_dir, option in ((save_tokens, False, "--save-tokens"), (out, False, "--out"),
                              (save_images, True, "--save-images")):
        check_writable(p, is_dir, option)

    import torch
    if engine_dir:
        from flowar.runtime.load import open_engine_dir
        rt = open_engine_dir(engine_dir, backend, threads=threads)
        config, class_names, dev = rt.config, rt.class_names, rt.device
        defaults = rt.manifest.get("schedule_defaults", {})
        stages, can_decode, what = rt.stages, rt.manifest.get("vae") is not None, rt.detail
    else:
        from flowar.checkpoint import load_model
        from flowar.stages import TorchStages
        dev = _device(device)
        model, ck = load_model(ckpt, preset, config_path, use_ema=not raw_weights, device=dev)
        config, class_names, defaults = ck.config, ck.class_names, {}
        decoder = None
        if vae:
            from flowar.vae import load_vae
            decoder = load_vae(vae, expect_channels=config.latent_channels).to(dev).decode
        stages, can_decode, what = TorchStages(model, decoder), decoder is not None, f"eager PyTorch on {dev}"
    steps = steps if steps is not None else defaults.get("steps", 25)
    cfg = cfg if cfg is not None else defaults.get("cfg", 4.3)
    guidance = guidance if guidance is not None else defaults.get("guidance", 0.9)
    validate_sampling_args(steps, cfg, guidance)
    if (out or save_images) and not can_decode:
        raise FlowARError("a VAE to decode images for --out/--save-images",
                          "an engine directory exported without --vae" if engine_dir else "no --vae",
                          "pass --vae PATH (or re-export with --vae), or use --save-tokens only")
    ids = parse_labels(config, labels, classes, class_names, n_per_class)
    if batch_size is not None and batch_size < 1:
        raise FlowARError("--batch >= 1", str(batch_size), "use e.g. --batch 8")
    if engine_dir:
        limit = rt.manifest["max_batch"]
        if batch_size is not None and batch_size > limit:
            raise FlowARError(f"--batch at most {limit} (the engines' max batch)", str(batch_size),
                              f"use --batch {limit}, or re-export with --max-batch {batch_size}")
        batch_size = batch_size or limit
    click.echo(f"backend: {what}", err=True)
    from flowar.sampler import host_threads
    with torch.inference_mode(), host_threads(threads):
        result = run_sampling(stages, config, ids, steps, cfg, guidance, seed, noise_file,
                              decode=bool(out or save_images), device=dev, progress=True, batch_size=batch_size)
    lines = write_outputs(result, class_names, save_tokens, out, save_images, n_per_class if n_per_class > 1 else None)
    click.echo(f"sampled {len(ids)} x {config.latent_size}x{config.latent_size} token maps with {what} in "
               f"{result.seconds:.2f} s ({steps} steps, cfg {cfg}, guidance {guidance})")
    for line in lines:
        click.echo("  " + line)


@click.command(context_settings=CONTEXT)
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="FlowAR checkpoint to export.")
@click.option("--preset", help="Config preset for files that carry none.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config JSON for files that carry none.")
@click.option("--raw-weights", is_flag=True, help="Export 'model' instead of the EMA weights of a training checkpoint.")
@click.option("--vae", type=click.Path(), help="VAE whose decoder becomes the decode stage (omit: tokens only).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Engine directory to write (replaced "
              "only when the new one is complete).")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "trt", "all"]),
              help="ort: ONNX graphs for ONNX Runtime; trt/all: also TensorRT plans.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option("--max-batch", default=8, show_default=True, type=int, help="Largest batch the engines serve.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare every stage with eager PyTorch.")
@click.option("--steps", default=25, show_default=True, type=int, help="Default steps recorded for flowar-run.")
@click.option("--cfg", default=4.3, show_default=True, type=float, help="Default cfg recorded for flowar-run.")
@click.option("--guidance", default=0.9, show_default=True, type=float, help="Default guidance recorded for flowar-run.")
@click.option("--compute-capability", help="TensorRT target without a GPU, e.g. sm80, sm86, sm89, sm120.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def export_cmd(ckpt, preset, config_path, raw_weights, vae, out, backend, precision, max_batch, verify, steps, cfg,
               guidance, compute_capability, debug):
    """Export a checkpoint to per-stage ONNX graphs (and TensorRT plans) with a manifest."""
    from flowar.build import build_engine_dir
    from flowar.outputs import check_writable
    from flowar.schedule import validate_sampling_args
    validate_sampling_args(steps, cfg, guidance)
    check_writable(out, True, "--out")
    from tqdm import tqdm
    n = 4 if vae else 3
    total = n * (2 if verify else 1) + (n if backend in ("trt", "all") else 0)
    bar = tqdm(total=total, desc="export", unit="step", disable=None, leave=False)

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1) if bar.n < total else None

    rep = build_engine_dir(ckpt, out, preset, config_path, vae, backend, precision, max_batch, verify, not raw_weights,
                           {"steps": steps, "cfg": cfg, "guidance": guidance}, compute_capability, step)
    bar.close()
    for c in rep.checks:
        click.echo(f"  {c.name:<10} max abs diff vs eager {c.worst:.2e} (tolerance {c.tolerance:.0e}) worst at {c.where}")
    secs = sum(rep.seconds.values())
    click.echo(f"engine directory -> {rep.out} ({', '.join(rep.backends)}, {precision}, max batch {max_batch}) in {secs:.0f} s")




@click.command(context_settings=CONTEXT)
@click.option("--data", default="animal-mnist", show_default=True, help="animal-mnist, or ROOT/<class>/<image> folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output diffusers VAE folder.")
@click.option("--size", default=32, show_default=True, type=int, help="Image side (Animal-MNIST is padded to it).")
@click.option("--latent-channels", default=4, show_default=True, type=int)
@click.option("--steps", default=1500, show_default=True, type=int)
@click.option("--batch", default=64, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def train_vae_cmd(data, out, size, latent_channels, steps, batch, lr, seed, debug):
    """Train the small AutoencoderKL the default model uses."""
    from flowar.outputs import check_writable
    from flowar.train_vae import VAETrainArgs, train_vae
    check_writable(out, True, "--out")
    res = train_vae(VAETrainArgs(data=data, out=out, size=size, latent_channels=latent_channels, steps=steps,
                                 batch=batch, lr=lr, seed=seed))
    click.echo(f"VAE -> {res['out']} in {res['seconds']:.0f} s, final reconstruction loss {res['final_reconstruction_loss']:.4f}")



@click.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, loss.png, samples/).")
@click.option("--vae", required=True, type=click.Path(), help="VAE the latents come from (diffusers folder or kl16.ckpt).")
@click.option("--data", default="animal-mnist", show_default=True, help="animal-mnist, or ROOT/<class>/<image> folder.")
@click.option("--size", default=32, show_default=True, type=int, help="Image side.")
@click.option("--preset", help="Take widths/depths from a preset (scales, channels, classes follow the data).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Full config JSON instead.")
@click.option("--steps", default=2000, show_default=True, type=int)
@click.option("--batch", default=64, show_default=True, type=int, help="Global batch (split over torchrun ranks).")
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--warmup", default=100, show_default=True, type=int)
@click.option("--ema-decay", default=0.999, show_default=True, type=float)
@click.option("--grad-clip", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--log-every", default=50, show_default=True, type=int)
@click.option("--sample-every", default=500, show_default=True, type=int, help="Sample grid PNG every N steps (0: off).")
@click.option("--ckpt-every", default=500, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint-last.safetensors.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def train_cmd(out, vae, data, size, preset, config_path, steps, batch, lr, warmup, ema_decay, grad_clip, seed,
              log_every, sample_every, ckpt_every, resume, debug):
    """Train FlowAR with the official multi-scale flow-matching loss (runs under torchrun too)."""
    from flowar.outputs import check_writable
    from flowar.train import TrainArgs, train
    check_writable(out, True, "--out")
    for name, v in (("--steps", steps), ("--batch", batch), ("--log-every", log_every), ("--ckpt-every", ckpt_every)):
        if v < 1:
            raise FlowARError(f"{name} >= 1", str(v), f"pass a positive {name}")
    t0 = __import__("time").perf_counter()
    st = train(TrainArgs(out=out, vae=vae, data=data, size=size, preset=preset, config=config_path, steps=steps,
                         batch=batch, lr=lr, warmup=warmup, ema_decay=ema_decay, grad_clip=grad_clip, seed=seed,
                         log_every=log_every, sample_every=sample_every, ckpt_every=ckpt_every, resume=resume))
    if int(os.environ.get("RANK", "0")) == 0:
        tail = st.losses[-min(100, len(st.losses)):]
        click.echo(f"trained to step {st.step} in {__import__('time').perf_counter() - t0:.0f} s; mean loss of the "
                   f"last {len(tail)} steps {sum(tail) / max(1, len(tail)):.4f}; weights -> {Path(out) / 'model.safetensors'}")



@click.command(context_settings=CONTEXT)
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="An Animal-MNIST FlowAR checkpoint.")
@click.option("--vae", required=True, type=click.Path(), help="Its VAE.")
@click.option("--per-class", default=50, show_default=True, type=int, help="Samples per class.")
@click.option("--steps", default=25, show_default=True, type=int)
@click.option("--cfg", default=3.0, show_default=True, type=float)
@click.option("--guidance", default=0.9, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--judge-cache", default=".cache/flowar-judge.safetensors", show_default=True, type=click.Path(dir_okay=False),
              help="Where the judge's weights are kept once trained.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def judge_cmd(ckpt, vae, per_class, steps, cfg, guidance, seed, judge_cache, debug):
    """Class accuracy of generated samples, scored by a classifier trained on real Animal-MNIST."""
    from flowar.checkpoint import load_model
    from flowar.judge import judge_model
    from flowar.outputs import check_writable
    from flowar.schedule import validate_sampling_args
    from flowar.stages import TorchStages
    from flowar.vae import load_vae
    validate_sampling_args(steps, cfg, guidance)
    check_writable(judge_cache, False, "--judge-cache")
    model, ck = load_model(ckpt)
    if ck.config.num_classes != 10:
        raise FlowARError("an Animal-MNIST model (10 classes)", f"{ck.config.num_classes} classes", "pass the default model")
    dec = load_vae(vae, expect_channels=ck.config.latent_channels).decode
    rep = judge_model(TorchStages(model, dec), ck.config, per_class, steps, cfg, guidance, seed,
                      cache=Path(judge_cache))
    click.echo(f"judge: held-out accuracy on real images {rep.held_out_accuracy:.1%} (2,000 held-out images)")
    click.echo(f"generated: {rep.class_accuracy:.1%} of {rep.n_samples} samples judged the requested class "
               f"(steps {steps}, cfg {cfg}, guidance {guidance}, seed {seed}) in {rep.seconds:.0f} s")
    names = ck.class_names or [str(i) for i in range(10)]
    click.echo("  " + ", ".join(f"{n} {a:.0%}" for n, a in zip(names, rep.per_class)))


def _entry(cmd: click.Command, prog: str):
    """A console-script entry point: the hub's offline switch is set before anything imports it."""
    def main() -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cmd(prog_name=prog)
    return main


run_main = _entry(run, "flowar-run")
export_main = _entry(export_cmd, "flowar-export")
train_main = _entry(train_cmd, "flowar-train")
train_vae_main = _entry(train_vae_cmd, "flowar-train-vae")
judge_main = _entry(judge_cmd, "flowar-judge")
