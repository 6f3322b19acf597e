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


def schedule_options(recorded_by: str):
    """--schedule/--solver/--stride/--steps/--cfg/--guidance, each unset unless given (see sampling_schedule)."""
    def apply(f):
        opts = [
            click.option("--schedule", type=click.Choice(["official", "fast"]),
                         help=f"official: the official Euler sampler (24 steps per scale); fast: the same steps with "
                              f"the head run on 1 in 3 and the rest predicted (2.7x fewer head evaluations; images "
                              f"within ~40 dB of official) [default: official, or {recorded_by}]."),
            click.option("--solver", type=click.Choice(["euler", "ab2", "heun", "skip"]),
                         help="Override the schedule's ODE solver."),
            click.option("--stride", type=int, help="skip solver: run the head on 1 step in N (the schedule's: 3)."),
            click.option("--steps", type=int, help="Points of the official time grid (25 = 24 steps) [default: the "
                                                   f"schedule's, or {recorded_by}]."),
            click.option("--cfg", type=float, help=f"Guidance weight at the last scale, 1 = off [default: 4.3, or "
                                                   f"{recorded_by}]."),
            click.option("--guidance", type=float, help=f"Guide only at t <= this [default: 0.9, or {recorded_by}]."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


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
@schedule_options("the engine directory's")
@click.option("--seed", default=0, show_default=True, type=int, help="Names the images: sample i's noise depends "
              "only on (seed, i), whatever the batch size or backend.")
@click.option("--noise", "noise_file", type=click.Path(dir_okay=False), help="safetensors with noise0..noise{n-1} "
              "to replay instead (the official layout: (2B, s^2, C) per scale for all requested samples).")
@click.option("--save-tokens", type=click.Path(dir_okay=False), help="Write tokens (B,C,H,W) to this safetensors file.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write a labelled PNG grid here.")
@click.option("--save-images", type=click.Path(file_okay=False), help="Write one PNG per sample into this folder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] (--ckpt path).")
@click.option("--threads", type=int, help="CPU cores to compute on [default: every core this process may use].")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="On a CUDA device, capture each scale once and replay it (TensorRT or PyTorch stages; the same "
                   "loop). On the CPU the same plan runs without capture.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def run(ckpt, engine_dir, backend, preset, config_path, raw_weights, vae, labels, classes, n_per_class, batch_size,
        schedule, solver, stride, steps, cfg, guidance, seed, noise_file, save_tokens, out, save_images, device, threads,
        cuda_graphs, debug):
    """Sample images from a FlowAR checkpoint (eager PyTorch) or an engine directory (runtime)."""
    from flowar.outputs import check_writable
    from flowar.run import parse_labels, run_sampling, write_outputs
    from flowar.schedule import sampling_schedule
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
        vae_mod = None
        if vae:
            from flowar.vae import load_vae
            vae_mod = load_vae(vae, expect_channels=config.latent_channels).to(dev)
        stages, can_decode, what = (TorchStages(model, vae_mod.decode if vae_mod else None), vae_mod is not None,
                                    f"eager PyTorch on {dev}")
    sched = sampling_schedule(config.n_scales, defaults, schedule=schedule, steps=steps, cfg=cfg, guidance=guidance,
                              solver=solver, stride=stride)
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
    runner, graphs = None, "off"
    if cuda_graphs and (engine_dir or dev.type == "cuda"):
        from flowar.runtime.cudagraph import GraphRunner
        capturable = dev.type == "cuda" and (not engine_dir or rt.backend in ("trt", "torch"))
        if dev.type == "cuda" and not engine_dir:           # static buffers: the reference modules as engines
            from flowar.runtime.pipeline import torch_engine_stages
            stages = torch_engine_stages(model, batch_size or len(ids), dev, vae_mod)
        runner = GraphRunner(dev, capture=capturable)
        graphs = ("on" if capturable else "off (ONNX Runtime sessions are not captured)" if dev.type == "cuda"
                  else "off (CPU: the same plan without capture)")
    click.echo(f"backend: {what}; schedule: {sched.describe()}; CUDA graphs {graphs}", err=True)
    from flowar.sampler import host_threads
    with torch.inference_mode(), host_threads(threads):
        result = run_sampling(stages, config, ids, sched, seed, noise_file, decode=bool(out or save_images),
                              device=dev, progress=True, batch_size=batch_size, runner=runner)
    lines = write_outputs(result, class_names, save_tokens, out, save_images, n_per_class if n_per_class > 1 else None)
    click.echo(f"sampled {len(ids)} x {config.latent_size}x{config.latent_size} token maps with {what} in "
               f"{result.seconds:.2f} s ({sched.name or sched.solver}, {sched.head_evals} head evaluations per sample, "
               f"cfg {sched.cfg}, guidance {sched.guidance})")
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
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="auto: measure per stage ONNX Runtime fp32, PyTorch fp32 and PyTorch bf16 on this machine and keep "
                   "the fastest that samples like fp32 (recorded in the manifest); fp16/bf16: reduced ONNX graphs.")
@click.option("--auto-candidates", help="With --precision auto: only these, e.g. ort-fp32,torch-bf16.")
@click.option("--max-batch", default=8, show_default=True, type=int, help="Largest batch the engines serve.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare every stage with eager PyTorch.")
@click.option("--schedule", default="official", show_default=True, type=click.Choice(["official", "fast"]),
              help="Default schedule recorded for flowar-run (which can still choose either).")
@click.option("--steps", type=int, help="Default grid points recorded for flowar-run [default: the schedule's].")
@click.option("--cfg", default=4.3, show_default=True, type=float, help="Default cfg recorded for flowar-run.")
@click.option("--guidance", default=0.9, show_default=True, type=float, help="Default guidance recorded for flowar-run.")
@click.option("--compute-capability", help="TensorRT target without a GPU, e.g. sm80, sm86, sm89, sm120.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def export_cmd(ckpt, preset, config_path, raw_weights, vae, out, backend, precision, auto_candidates, max_batch, verify,
               schedule, steps, cfg, guidance, compute_capability, debug):
    """Export a checkpoint to per-stage ONNX graphs (and TensorRT plans) with a manifest."""
    from flowar.build import build_engine_dir
    from flowar.outputs import check_writable
    from flowar.schedule import sampling_schedule
    defaults = {"schedule": schedule, "steps": steps, "cfg": cfg, "guidance": guidance}
    sampling_schedule(2, defaults)                     # refuse values flowar-run would refuse, before any work
    check_writable(out, True, "--out")
    from tqdm import tqdm
    n = 4 if vae else 3
    total = n * (2 if verify else 1) + (n if backend in ("trt", "all") else 0)
    bar = tqdm(total=total, desc="export", unit="step", disable=None, leave=False)

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1) if bar.n < total else None

    rep = build_engine_dir(ckpt, out, preset, config_path, vae, backend, precision, max_batch, verify, not raw_weights,
                           {k: v for k, v in defaults.items() if v is not None}, compute_capability, step,
                           tuple(c.strip() for c in auto_candidates.split(",") if c.strip()) if auto_candidates else None)
    bar.close()
    for c in rep.checks:
        click.echo(f"  {c.name:<10} max abs diff vs eager {c.worst:.2e} (tolerance {c.tolerance:.0e}) worst at {c.where}")
    if rep.auto is not None:
        a = rep.auto
        for stage, ms in a.measured.items():
            cells = ", ".join(f"{c} {m.seconds * 1e3:.1f} ms (err {m.error:.1e}{'' if m.ok else ', too far'})"
                              for c, m in ms.items())
            click.echo(f"  auto {stage:<10} -> {a.choice[stage]:<10} [{cells}]")
        e = a.end_to_end
        quality = (f"PSNR vs fp32 median {e['psnr_median']:.1f} dB, worst {e['psnr_worst']:.1f} dB" if "psnr_median" in e
                   else f"token error mean {e['token_mean']:.2e}")
        click.echo(f"  auto end to end on {e['samples']} samples: {quality}"
                   + (f"; reduced precision rejected for {', '.join(a.fallback)}" if a.fallback else ""))
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
@click.option("--ckpt", type=click.Path(dir_okay=False), help="A FlowAR checkpoint (eager PyTorch).")
@click.option("--engine-dir", type=click.Path(file_okay=False), help="Or an engine directory (what it runs by "
              "default: its auto choice, else ONNX Runtime).")
@click.option("--preset", help="Config preset for files that carry none.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config JSON for files that carry none.")
@click.option("--vae", type=click.Path(), help="Its VAE (--ckpt; omit for token errors only).")
@click.option("--per-class", default=50, show_default=True, type=int, help="Samples per class.")
@click.option("--classes-limit", default=10, show_default=True, type=int, help="Sample the first N classes (models "
              "with many classes).")
@schedule_options("the engine directory's")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch", default=50, show_default=True, type=int, help="Samples per batch (changes speed, not images).")
@click.option("--converged", is_flag=True, help="Also compare with a converged reference (Euler, 400 uniform steps).")
@click.option("--fid-stats", type=click.Path(dir_okay=False), help="Reference statistics (.npz with mu, sigma; the "
              "ADM / MAR format) for an FID of the generated images.")
@click.option("--fid-extractor", type=click.Path(dir_okay=False), help="The feature extractor those statistics were "
              "made with: a local TorchScript file (e.g. inception-2015-12-05.pt of the StyleGAN3 FID code).")
@click.option("--judge-cache", default=".cache/flowar-judge.safetensors", show_default=True,
              type=click.Path(dir_okay=False), help="Where the Animal-MNIST judge's weights are kept once trained.")
@click.option("--vs-engine-dir", type=click.Path(file_okay=False), help="Also compare with the same samples from "
              "another engine directory (e.g. fp32 engines, to measure a reduced precision).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report here as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def judge_cmd(ckpt, engine_dir, preset, config_path, vae, per_class, classes_limit, schedule, solver, stride, steps,
              cfg, guidance, seed, batch, converged, fid_stats, fid_extractor, judge_cache, vs_engine_dir, json_out,
              debug):
    """Quality of a schedule: PSNR and token error against the official sampler with the same noise,
    class accuracy and a domain Frechet distance by an independent judge (Animal-MNIST models),
    a converged reference, and FID against reference statistics."""
    from flowar.outputs import check_writable
    from flowar.quality import load_extractor, measure, read_fid_stats
    from flowar.schedule import sampling_schedule
    if bool(ckpt) == bool(engine_dir):
        raise FlowARError("exactly one of --ckpt or --engine-dir", "both" if ckpt else "neither", "pass one of them")
    if bool(fid_stats) != bool(fid_extractor):
        raise FlowARError("--fid-stats and --fid-extractor together", "only one of them",
                          "pass the statistics and the extractor they were made with")
    for name, v in (("--per-class", per_class), ("--batch", batch), ("--classes-limit", classes_limit)):
        if v < 1:
            raise FlowARError(f"{name} >= 1", str(v), f"pass a positive {name}")
    check_writable(judge_cache, False, "--judge-cache")
    check_writable(json_out, False, "--json")
    stats = read_fid_stats(fid_stats) if fid_stats else None
    extractor = load_extractor(fid_extractor) if fid_extractor else None
    if engine_dir:
        from flowar.runtime.load import open_engine_dir
        rt = open_engine_dir(engine_dir, "auto")
        config, class_names, stages, recorded = rt.config, rt.class_names, rt.stages, rt.manifest.get("schedule_defaults")
        decode = rt.manifest.get("vae") is not None
        batch = min(batch, rt.manifest["max_batch"])
    else:
        from flowar.checkpoint import load_model
        from flowar.stages import TorchStages
        model, ck = load_model(ckpt, preset, config_path)
        config, class_names, recorded = ck.config, ck.class_names, None
        dec = None
        if vae:
            from flowar.vae import load_vae
            dec = load_vae(vae, expect_channels=config.latent_channels).decode
        stages, decode = TorchStages(model, dec), dec is not None
    sched = sampling_schedule(config.n_scales, recorded, schedule=schedule, steps=steps, cfg=cfg, guidance=guidance,
                              solver=solver, stride=stride)
    judge = None
    if config.num_classes == 10 and decode and class_names and class_names[0] == "bear":
        from flowar.judge import train_judge
        judge = train_judge(cache=Path(judge_cache))
    labels = [c for c in range(min(classes_limit, config.num_classes)) for _ in range(per_class)]
    other = None
    if vs_engine_dir:
        from flowar.runtime.load import open_engine_dir
        other = open_engine_dir(vs_engine_dir, "auto")
        if other.config != config:
            raise FlowARError("--vs-engine-dir exported from the same model", "another config", "pass a matching one")
        batch = min(batch, other.manifest["max_batch"])
    rep = measure(stages, config, labels, sched, seed, batch, decode, judge, judge.real_stats if judge else None,
                  converged, stats, extractor, progress=True, reference_stages=other.stages if other else None)
    click.echo(f"schedule: {rep.schedule}; {rep.n_samples} samples, seed {seed}, sampled in {rep.seconds:.1f} s")
    o = rep.vs_official
    click.echo(f"vs the official schedule (same noise): tokens max {o['token_max']:.2e} mean {o['token_mean']:.2e}"
               + (f"; image PSNR median {o['psnr_median']:.1f} dB, worst {o['psnr_worst']:.1f} dB" if decode else ""))
    if rep.vs_reference:
        r = rep.vs_reference
        click.echo(f"vs {vs_engine_dir} ({other.detail}), same samples: tokens max {r['token_max']:.2e} mean "
                   f"{r['token_mean']:.2e}" + (f"; image PSNR median {r['psnr_median']:.1f} dB, worst "
                                               f"{r['psnr_worst']:.1f} dB" if decode else ""))
    if rep.vs_converged:
        c = rep.vs_converged
        click.echo(f"vs a converged reference (400 Euler steps): tokens mean {c['token_mean']:.2e} (the official "
                   f"schedule's: {c['official_token_mean']:.2e}), max {c['token_max']:.2e}")
    if judge is not None:
        click.echo(f"judge (held-out accuracy on real images {rep.judge_held_out_accuracy:.1%}): {rep.class_accuracy:.1%} "
                   f"judged the requested class; Frechet distance to held-out real images in its features "
                   f"{rep.frechet_judge:.2f}")
        names = class_names or [str(i) for i in range(10)]
        click.echo("  " + ", ".join(f"{n} {a:.0%}" for n, a in zip(names, rep.per_class)))
    if rep.fid is not None:
        click.echo(f"FID against {Path(fid_stats).name}: {rep.fid:.3f}")
    if json_out:
        import dataclasses
        import json
        from flowar.outputs import atomic_write_bytes
        atomic_write_bytes(json_out, lambda tmp: Path(tmp).write_text(json.dumps(dataclasses.asdict(rep), indent=1)))


@click.command(context_settings=CONTEXT)
@click.option("--engine-dir", required=True, type=click.Path(file_okay=False), help="Engine directory (with a VAE).")
@click.option("--num-images", required=True, type=int, help="How many images, e.g. 50000 for an FID evaluation.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder: png/, shards/, samples.npz.")
@click.option("--labels", help="Comma-separated class ids to cycle through [default: every class, balanced].")
@click.option("--classes", help="Or class names, for models that store them.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sample i gets the noise of (seed, i).")
@schedule_options("the engine directory's")
@click.option("--workers", default=1, show_default=True, type=int, help="Ray actors, one engine set each.")
@click.option("--threads", default=1, show_default=True, type=int, help="Cores per worker (the same for any "
              "--workers, so the images are too).")
@click.option("--shard-size", default=64, show_default=True, type=int, help="Images per shard (the unit of resume).")
@click.option("--ray-address", help="A running Ray cluster (ray://HOST:PORT or auto) [default: a local one].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def sample_cmd(engine_dir, num_images, out, labels, classes, seed, schedule, solver, stride, steps, cfg, guidance,
               workers, threads, shard_size, ray_address, debug):
    """Bulk sampling on Ray Data: PNG shards and samples.npz (ADM format); rerun to resume."""
    from flowar.bulk import BulkSpec, run_bulk
    from flowar.export.manifest import read_manifest
    from flowar.outputs import check_writable
    from flowar.run import parse_labels
    check_writable(out, True, "--out")
    m = read_manifest(engine_dir)
    ids = parse_labels(m["config_obj"], labels, classes, m.get("class_names"))
    if not labels and not classes:
        ids = list(range(m["config_obj"].num_classes))
    sched = {k: v for k, v in dict(schedule=schedule, steps=steps, cfg=cfg, guidance=guidance, solver=solver,
                                   stride=stride).items() if v is not None}
    spec = BulkSpec(str(Path(engine_dir).resolve()), num_images, ids, seed, sched, shard_size, threads)
    rep = run_bulk(spec, out, workers, ray_address)
    kept = f", {rep.shards_done_before} kept from before" if rep.shards_done_before else ""
    click.echo(f"{num_images} images in {rep.shards_total} shards{kept} -> {rep.out / 'samples.npz'} "
               f"({rep.seconds:.1f} s, {rep.images_per_s:.1f} images/s on {workers} worker(s) x {threads} thread(s))")


@click.command(context_settings=CONTEXT)
@click.option("--engine-dir", required=True, type=click.Path(file_okay=False), help="Engine directory (with a VAE).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--replicas", default=1, show_default=True, type=int, help="Replicas, one engine set each.")
@click.option("--threads", type=int, help="Cores per replica [default: the machine's cores shared out among the replicas].")
@click.option("--max-n", default=16, show_default=True, type=int, help="Most images one request may ask for.")
@click.option("--ray-address", help="A running Ray cluster [default: a local one].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@user_errors
def serve_cmd(engine_dir, host, port, replicas, threads, max_n, ray_address, debug):
    """Serve POST /v1/generate with dynamic batching on Ray Serve (GET /health, GET /v1/stats)."""
    from flowar.export.manifest import read_manifest
    from flowar.serve import serve_forever
    m = read_manifest(engine_dir)
    if m.get("vae") is None:
        raise FlowARError("an engine directory with a decode stage (images)", "one exported without --vae",
                          "re-export with --vae")
    for name, v in (("--replicas", replicas), ("--max-n", max_n), ("--threads", 1 if threads is None else threads)):
        if v < 1:
            raise FlowARError(f"{name} >= 1", str(v), f"pass a positive {name}")
    if not 0 < port < 65536:
        raise FlowARError("--port in 1..65535", str(port), "use e.g. --port 8000")
    threads = threads or max(1, (os.cpu_count() or 1) // replicas)
    serve_forever(str(Path(engine_dir).resolve()), host, port, threads, max_n, replicas, ray_address,
                  ready=lambda: click.echo(f"serving {engine_dir} on http://{host}:{port} (POST /v1/generate, "
                                           f"GET /health); Ctrl-C stops", err=True))


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
sample_main = _entry(sample_cmd, "flowar-sample")
serve_main = _entry(serve_cmd, "flowar-serve")
