"""Command-line entry points: a thin click layer over typed functions.

A user error prints one line (``error: expected ...; got ...; Fix: ...``) and exits with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from flowar.commands.options import STARTED, command, joined, positive, schedule_options
from flowar.config import MAX_BATCH, SAMPLING_DEFAULTS, check_seed
from flowar.errors import FlowARError


@command("flowar-run")
@click.option("--ckpt", type=click.Path(dir_okay=False), help="FlowAR checkpoint (eager PyTorch): official .pth, "
              "training checkpoint, or this project's .safetensors (with --engine-dir and --backend torch: the "
              "checkpoint the directory was exported from, where it has moved).")
@click.option("--engine-dir", type=click.Path(), help="Engine directory from flowar-export.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "ort", "trt", "torch"]),
              help="With --engine-dir: auto = TensorRT when a GPU and plans are there, else the engines the "
              "export's --precision auto|bf16 measured and chose, else ONNX Runtime.")
@click.option("--preset", help="Config preset for files that carry none: flowar-s, flowar-l, flowar-h, tiny.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config JSON for files that carry none.")
@click.option("--raw-weights", is_flag=True, help="Use 'model' instead of the EMA weights of a training checkpoint.")
@click.option("--vae", type=click.Path(), help="VAE: MAR kl16.ckpt or a diffusers folder (--ckpt path; engine "
              "directories carry their decoder).")
@click.option("--labels", multiple=True, callback=joined, help="Comma-separated class ids, e.g. 3,7 (default: the first 10 classes).")
@click.option("--classes", multiple=True, help="Class names, e.g. cat,dog (ImageNet names and synonyms for the "
              "official 1000-class models); names that contain commas: separate with ';' or repeat the option.")
@click.option("--n-per-class", default=1, show_default=True, type=int, help="Samples per requested class (at most "
              "10000; kept in memory until written: for more, flowar-sample).")
@click.option("--batch", "batch_size", type=int, help="Samples per batch [default: with --engine-dir the batch "
              "with the best images/s in the call plan measured at export, else the engines' max batch; with --ckpt "
              "all at once where that fits in memory, else the largest batch that does (on a GPU with CUDA graphs, 16)].")
@schedule_options("the engine directory's")
@click.option("--seed", default=0, show_default=True, type=int, help="Names the images: sample i's noise depends "
              "only on (seed, i), whatever the batch size or backend.")
@click.option("--noise", "noise_file", type=click.Path(dir_okay=False), help="safetensors with noise0..noise{n-1} "
              "to replay instead (the official layout: (2B, s^2, C) per scale for all requested samples).")
@click.option("--save-tokens", type=click.Path(dir_okay=False), help="Write tokens (B,C,H,W) to this safetensors file.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write a labelled PNG grid here.")
@click.option("--save-images", type=click.Path(file_okay=False), help="Write one PNG per sample into this folder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]: where --ckpt (or "
              "--backend torch) computes; other engines compute where they were made for.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]),
              help="--ckpt path: bf16 computes the GEMMs in bf16 with float32 around them (engine directories "
                   "record their own: flowar-export --precision).")
@click.option("--threads", type=int, help="CPU cores to compute on, at most the machine's cores (more are taken as "
              "that many) [default: every core this process may use].")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="On a CUDA device, capture each scale once and replay it (TensorRT or PyTorch stages; the same "
                   "loop). On the CPU the same plan runs without capture.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def run(ckpt, engine_dir, backend, preset, config_path, raw_weights, vae, labels, classes, n_per_class, batch_size,
        schedule, solver, stride, steps, cfg, guidance, seed, noise_file, save_tokens, out, save_images, device,
        precision, threads, cuda_graphs, debug):
    """Sample images from a FlowAR checkpoint (eager PyTorch) or an engine directory (runtime)."""
    began = time.perf_counter() - STARTED[0]        # (Python and PyTorch loaded: a second no line said)
    from flowar.export.manifest import read_manifest
    from flowar.io.outputs import check_requested, write_outputs
    from flowar.runtime.runtime import Runtime
    from flowar.sampling.batches import read_noise
    from flowar.sampling.labels import parse_labels
    from flowar.sampling.schedule import Settings
    settings = Settings(schedule=schedule, steps=steps, cfg=cfg, guidance=guidance, solver=solver, stride=stride)
    check_seed(seed)
    parse_labels(None, None, labels, classes, n_per_class)     # their form, before the source opens (FlowAR-H: 25 s)
    check_requested(save_tokens, out, save_images, [ckpt, engine_dir, vae, config_path, noise_file])
    if batch_size is not None and batch_size < 1:         # (before the source opens: FlowAR-H takes 25 s)
        raise FlowARError("--batch >= 1", str(batch_size), "use e.g. --batch 8")
    if noise_file is not None and not Path(noise_file).is_file():
        raise FlowARError("a safetensors noise file", f"no file at {noise_file}", "check the --noise path")
    if not (ckpt or engine_dir) or (ckpt and engine_dir and backend != "torch"):
        raise FlowARError("exactly one of --ckpt or --engine-dir (both: --backend torch from a directory whose "
                          "checkpoint moved)", "both" if ckpt else "neither",
                          "pass --engine-dir DIR (from flowar-export) or --ckpt PATH")
    # the settings, the batch and the noise against what the directory records, before the source opens (FlowAR-H: 25 s)
    m = read_manifest(engine_dir) if engine_dir else None
    settings.resolve(1, m.schedule_defaults if m else None)      # (as a check: any scale count refuses the same)
    if m is not None and batch_size is not None and batch_size > m.max_batch:
        raise FlowARError(f"--batch at most {m.max_batch} (the engines' max batch)", str(batch_size),
                          f"use --batch {m.max_batch}, or re-export with --max-batch {min(batch_size, MAX_BATCH)}")
    if m is not None and noise_file is not None:
        read_noise(noise_file, m.config)
    t0 = time.perf_counter()
    with Runtime.open(engine_dir or ckpt, bool(engine_dir), backend=backend, preset=preset, config=config_path,
                      ckpt=ckpt if engine_dir else None,
                      vae=vae, raw_weights=raw_weights, device=device, threads=threads, cuda_graphs=cuda_graphs,
                      precision=precision) as rt:
        if out or save_images:
            rt.require_decoder()
        sched = rt.schedule(settings)
        ids = parse_labels(rt.config.num_classes, rt.class_names, labels, classes, n_per_class)
        if save_images:
            from flowar.io.images import check_image_folder
            check_image_folder(save_images, len(ids), out)
        if out or save_images:       # (every image is kept until written: --n-per-class 10^8 ran until killed)
            from flowar.io.memory import require_memory
            require_memory(len(ids) * rt.image_size ** 2 * 3 * 4 * 2, f"{len(ids)} images of {rt.image_size}x"
                           f"{rt.image_size}, kept until written", "sample fewer, or use flowar-sample (it writes "
                           "shards as it goes)")
        batch = min(len(ids), batch_size or rt.batch or len(ids))
        # opening prepared batch 1's shapes (see Runtime.warm_up); this batch's too
        if batch > 1 and (rt.max_batch is None or batch <= rt.max_batch):
            t1 = time.perf_counter()
            rt.opened["shapes warmed"] = rt.opened.get("shapes warmed", 0) + rt.warm_up([batch], every_engine=False)
            rt.opened["warm-up"] = rt.opened.get("warm-up", 0.0) + time.perf_counter() - t1
        opened = time.perf_counter() - t0
        shown = {k: v for k, v in rt.opened.items() if rt.opened.get("shapes warmed") or k not in ("warm-up", "shapes warmed")
                 or k == "warm-up" and v >= 0.05}      # (ONNX Runtime's sessions for row blocks: opened, not warmed)
        parts = ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        click.echo(f"opened {engine_dir or ckpt} in {opened:.2f} s" + (f" ({parts})" if parts else ""), err=True)
        click.echo(f"backend: {rt.detail}; schedule: {sched.describe()}; CUDA graphs "
                   f"{'on' if rt.runner else 'off'}", err=True)
        if not (save_tokens or out or save_images):     # (said before the work: it was said after 19 s of it)
            click.echo(f"a timing run of {len(ids)} token map{'s' * (len(ids) > 1)}, nothing decoded or written: pass --out grid.png, "
                       "--save-images DIR or --save-tokens FILE to keep what is sampled", err=True)
        result = rt.sample(ids, sched, seed=seed, noise_file=noise_file, batch_size=batch_size,
                           decode=bool(out or save_images), progress=True)
    lines = write_outputs(result, rt.class_names, save_tokens, out, save_images, n_per_class if n_per_class > 1 else None,
                          rt.config.latent_scale)
    side = rt.config.latent_size
    click.echo(f"sampled {len(ids)} x {side}x{side} token maps with {rt.detail} in {result.seconds:.2f} s "
               f"({sched.name or sched.solver}, {sched.head_evals} head evaluations per sample, cfg {sched.cfg}, "
               f"guidance {sched.guidance})")
    for line in lines:
        click.echo("  " + line)
    if STARTED[0]:                      # (what a person timing the command sees: 4.3 s where the lines said 3.0)
        total = time.perf_counter() - STARTED[0]
        click.echo(f"whole command {total:.2f} s: starting Python and PyTorch {began:.2f} s, opening {opened:.2f} s, "
                   f"sampling {result.seconds:.2f} s, the rest {total - began - opened - result.seconds:.2f} s", err=True)


@command("flowar-export")
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
              help="On the CPU (--backend ort): auto = per stage the fastest engine of this machine that samples like "
                   "fp32 (ONNX Runtime or PyTorch, fp32 or bf16; timed in the pipeline, never slower than eager "
                   "fp32), bf16 = the fastest bf16 engines, no accuracy gate, the deviation reported. With TensorRT: "
                   "the graphs' precision (fp16/bf16 strongly typed).")
@click.option("--auto-candidates", help="With --precision auto/bf16: only these engines, e.g. ort-fp32,torch-bf16 "
              "(ort-fp32, torch-fp32, torch-bf16, aoti-fp32, aoti-bf16).")
@click.option("--max-batch", default=8, show_default=True, type=int, help="Largest batch the engines serve.")
@click.option("--max-memory", type=float, help="With --precision auto/bf16: GB of memory the export may hold; a stage "
              "whose compile would take more (estimated from its weights) is not compiled and its other candidates "
              "are measured [default: what the machine has available].")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare every stage with eager PyTorch.")
@click.option("--schedule", default="official", show_default=True, type=click.Choice(["official", "fast"]),
              help="Default schedule recorded in the directory for every command and the Python API (each can "
                   "still choose either).")
@click.option("--steps", type=int, help="Default num_steps N recorded for the commands (the official sampler's N: 25 "
              "gives its 24 steps) [default: the schedule's].")
@click.option("--cfg", type=float, help=f"Default cfg recorded for the commands [default: {SAMPLING_DEFAULTS['cfg']}].")
@click.option("--guidance", type=float, help="Default guidance recorded for the commands [default: "
                                             f"{SAMPLING_DEFAULTS['guidance']}].")
@click.option("--compute-capability", help="TensorRT-RTX target without a GPU, e.g. sm86, sm89, sm120 [default: sm80].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def export_cmd(ckpt, preset, config_path, raw_weights, vae, out, backend, precision, auto_candidates, max_batch,
               max_memory, verify, schedule, steps, cfg, guidance, compute_capability, debug):
    """Export a checkpoint to per-stage ONNX graphs (and TensorRT plans) with a manifest."""
    from flowar.commands.build import build_engine_dir
    from flowar.io.files import check_outputs, check_writable
    from flowar.sampling.schedule import Settings
    # checked now, before any work (flowar-run would refuse what Settings refuses)
    defaults = SAMPLING_DEFAULTS | Settings(schedule=schedule, steps=steps, cfg=cfg, guidance=guidance).given()
    check_outputs([("--out", out)], [])         # (inputs inside --out: refused by the export, which replaces it)
    check_writable(out, True, "--out")
    if os.fsencode(out).decode("utf-8", "replace") != out:     # (ONNX Runtime's TypeError once the graphs were made)
        raise FlowARError("--out a path in UTF-8 (ONNX Runtime takes no other)", repr(os.fsencode(out)), "rename it")
    from flowar.io.progress import progress_bar
    bar = progress_bar(desc="export", unit="step", leave=False)

    def step(msg: str, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(msg)
        bar.update(1) if bar.n < total else None

    from flowar.io.files import used_alone
    with used_alone(out, "flowar-export"):      # (two exports into one --out both said they had written it)
        rep = build_engine_dir(ckpt, out, preset=preset, config_path=config_path, vae_path=vae, backend=backend,
                               precision=precision, max_batch=max_batch, verify=verify, use_ema=not raw_weights,
                               schedule_defaults=defaults, compute_capability=compute_capability, progress=step,
                               auto_candidates=tuple(c.strip() for c in auto_candidates.split(",") if c.strip())
                               if auto_candidates is not None else None, max_memory_gb=max_memory)   # ("": none, refused)
    bar.close()
    for line in rep.lines():
        click.echo(line)
    if not verify:                  # (said nowhere until flowar-check's "not verified against eager")
        click.echo("  note: the stages were not compared with eager PyTorch (--no-verify)")
    click.echo(rep.summary(precision, max_batch, decodes=vae is not None))


@command("flowar-train-vae")
@click.option("--data", default="animal-mnist", show_default=True, help="animal-mnist, or ROOT/<class>/<image> folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output diffusers VAE folder.")
@click.option("--size", default=32, show_default=True, type=int, help="Image side (Animal-MNIST is padded to it).")
@click.option("--latent-channels", default=4, show_default=True, type=int, help="Channels of the latent map (the "
              "FlowAR model trained on it takes them).")
@click.option("--steps", type=int, help="Optimizer steps [default: 1500; --resume: the run's own].")
@click.option("--batch", default=64, show_default=True, type=int, help="Images per step.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate (cosine decay to 0).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue a training that stopped (Ctrl-C) into OUT, with its settings.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def train_vae_cmd(data, out, size, latent_channels, steps, batch, lr, seed, resume, debug):
    """Train the small AutoencoderKL the default model uses (Ctrl-C: the VAE at that step, --resume continues)."""
    from flowar.io.files import check_writable
    from flowar.train.vae import VAETrainArgs, train_vae
    positive(("--steps", 1 if steps is None else steps), ("--batch", batch), ("--size", size),
             ("--latent-channels", latent_channels), ("--lr", lr))
    from flowar.io.files import check_outputs
    check_outputs([("--out", out)], [data if Path(data).exists() else None])
    check_writable(out, True, "--out")
    res = train_vae(VAETrainArgs(data=data, out=out, size=size, latent_channels=latent_channels, steps=steps,
                                 batch=batch, lr=lr, seed=seed, resume=resume))
    click.echo(f"VAE -> {res['out']} in {res['seconds']:.0f} s, final reconstruction loss {res['final_reconstruction_loss']:.4f}")


@command("flowar-train")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="A new run folder: model.safetensors (the "
              "EMA weights, what flowar-export and flowar-run take), checkpoint-last.safetensors, loss.png, samples/.")
@click.option("--vae", type=click.Path(), help="VAE the latents come from (diffusers folder or kl16.ckpt) [required; "
              "--resume: the run's own].")
@click.option("--data", default="animal-mnist", show_default=True, help="animal-mnist, or ROOT/<class>/<image> folder.")
@click.option("--size", default=32, show_default=True, type=int, help="Image side.")
@click.option("--preset", help="Widths/depths of a preset: tiny, flowar-s, flowar-l, flowar-h (scales, channels, classes "
              "follow the data) [default: tiny].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Full config JSON instead.")
@click.option("--steps", type=int, help="Optimizer steps in all (a resumed run continues to it) [default: 2000; "
              "--resume: the run's own].")
@click.option("--batch", default=64, show_default=True, type=int, help="Global batch (split over torchrun ranks).")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="AdamW peak learning rate.")
@click.option("--warmup", default=100, show_default=True, type=int, help="Steps of linear learning-rate warm-up.")
@click.option("--ema-decay", default=0.999, show_default=True, type=float, help="Decay of the EMA weights "
              "(model.safetensors holds them).")
@click.option("--grad-clip", default=1.0, show_default=True, type=float, help="Gradient norm clip.")
@click.option("--seed", default=0, show_default=True, type=int, help="Initial weights, batches, times and noise.")
@click.option("--log-every", default=50, show_default=True, type=int, help="A loss line every N steps where stderr is "
              "not a terminal (a terminal shows a bar).")
@click.option("--sample-every", default=500, show_default=True, type=int, help="Sample grid PNG every N steps (0: off).")
@click.option("--ckpt-every", default=500, show_default=True, type=int, help="Write checkpoint-last.safetensors and "
              "loss.png every N steps (and at the end).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint-last.safetensors with the run's settings.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def train_cmd(out, vae, data, size, preset, config_path, steps, batch, lr, warmup, ema_decay, grad_clip, seed,
              log_every, sample_every, ckpt_every, resume, debug):
    """Train FlowAR with the official multi-scale flow-matching loss (runs under torchrun too)."""
    from flowar.io.files import check_outputs, check_writable
    from flowar.train.trainer import TrainArgs, train
    if vae is None and not resume:          # (--resume alone takes the run's own: README)
        raise FlowARError("--vae: the VAE the latents come from", "none", "pass e.g. --vae models/default/vae")
    check_outputs([("--out", out)], [vae, config_path, data if Path(data).exists() else None])
    check_writable(out, True, "--out")
    positive(("--steps", 1 if steps is None else steps), ("--batch", batch), ("--log-every", log_every), ("--ckpt-every", ckpt_every),
              ("--size", size), ("--lr", lr), ("--grad-clip", grad_clip))
    for name, v, ok, fix in (("--warmup >= 0", warmup, warmup >= 0, "--warmup 0"), ("--sample-every >= 0", sample_every,
                             sample_every >= 0, "--sample-every 0 (off)"), ("--ema-decay in [0, 1)", ema_decay,
                             0 <= ema_decay < 1, "--ema-decay 0.999")):
        if not ok:               # (it said "in its range (see --help)", where no range is said)
            raise FlowARError(name, str(v), f"use e.g. {fix}")
    t0 = time.perf_counter()
    st = train(TrainArgs(out=out, vae=vae, data=data, size=size, preset=preset, config=config_path, steps=steps,
                         batch=batch, lr=lr, warmup=warmup, ema_decay=ema_decay, grad_clip=grad_clip, seed=seed,
                         log_every=log_every, sample_every=sample_every, ckpt_every=ckpt_every, resume=resume))
    if int(os.environ.get("RANK", "0")) == 0:
        tail = st.losses[-min(100, len(st.losses)):]
        click.echo(f"trained to step {st.step} in {time.perf_counter() - t0:.0f} s; mean loss of the "
                   f"last {len(tail)} steps {sum(tail) / max(1, len(tail)):.4f}; weights -> {Path(out) / 'model.safetensors'}")


@command("flowar-judge")
@click.option("--ckpt", type=click.Path(dir_okay=False), help="A FlowAR checkpoint (eager PyTorch).")
@click.option("--engine-dir", type=click.Path(), help="Or an engine directory (what it runs by "
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
              "made with: a local TorchScript file (e.g. inception-2015-12-05.pt of the StyleGAN3 FID code) or a "
              "torch.export program (.pt2).")
@click.option("--judge", "judge_kind", default="auto", show_default=True, type=click.Choice(["auto", "animal-mnist", "none"]),
              help="The independent classifier for class accuracy: auto = the one of the data the checkpoint was "
                   "trained on (its metadata; none without a decoder), animal-mnist, or none.")
@click.option("--judge-cache", type=click.Path(dir_okay=False), help="Where the Animal-MNIST judge's weights are "
              "kept once trained [default: $XDG_CACHE_HOME/flowar/judge.safetensors, else ~/.cache/flowar/...].")
@click.option("--vs-engine-dir", type=click.Path(file_okay=False), help="Also compare with the same samples from "
              "another engine directory (e.g. fp32 engines, to measure a reduced precision).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report here as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def judge_cmd(ckpt, engine_dir, preset, config_path, vae, per_class, classes_limit, schedule, solver, stride, steps,
              cfg, guidance, seed, batch, converged, fid_stats, fid_extractor, judge_kind, judge_cache, vs_engine_dir,
              json_out, debug):
    """Quality of a schedule: PSNR and token error against the official sampler with the same noise,
    class accuracy and a domain Frechet distance by an independent judge (Animal-MNIST models),
    a converged reference, and FID against reference statistics."""
    import contextlib
    from flowar.eval.quality import load_extractor, measure, probe_extractor, read_fid_stats, report_lines
    from flowar.io.files import check_outputs, check_writable
    from flowar.io.memory import require_memory
    from flowar.io.outputs import check_json_output
    from flowar.runtime.runtime import Runtime
    if bool(fid_stats) != bool(fid_extractor):
        raise FlowARError("--fid-stats and --fid-extractor together", "only one of them",
                          "pass the statistics and the extractor they were made with")
    for name, v in (("--per-class", per_class), ("--batch", batch), ("--classes-limit", classes_limit)):
        if v < 1:
            raise FlowARError(f"{name} >= 1", str(v), f"pass a positive {name}")
    check_seed(seed)
    check_outputs([("--json", json_out), ("--judge-cache", judge_cache)],
                  [ckpt, engine_dir, vae, config_path, fid_stats, fid_extractor, vs_engine_dir])
    check_writable(json_out, False, "--json")
    check_json_output(json_out)
    stats, extractor = (read_fid_stats(fid_stats), load_extractor(fid_extractor)) if fid_stats else (None, None)
    from flowar.sampling.schedule import Settings
    settings = Settings(schedule=schedule, steps=steps, cfg=cfg, guidance=guidance, solver=solver, stride=stride)
    if bool(ckpt) == bool(engine_dir):
        raise FlowARError("exactly one of --ckpt or --engine-dir", "both" if ckpt else "neither",
                          "pass --engine-dir DIR (from flowar-export) or --ckpt PATH")
    with contextlib.ExitStack() as stack:
        rt = stack.enter_context(Runtime.open(engine_dir or ckpt, bool(engine_dir), preset=preset, config=config_path,
                                              vae=vae, device=None if engine_dir else "cpu"))   # (engines: theirs)
        config, batch = rt.config, min(batch, rt.max_batch or batch)
        sched = rt.schedule(settings)
        n, held = per_class * min(classes_limit, config.num_classes), 1 + (sched.name != "official") + converged + bool(vs_engine_dir)
        per = 4 * (3 * rt.image_size ** 2 if rt.decodes else config.latent_channels * config.latent_size ** 2)
        require_memory(held * n * per, f"{n} samples, held {held}x (the judged, the references)", "pass a smaller --per-class")
        judge = None
        if stats is not None and not rt.decodes:     # (the distance was dropped without a word)
            raise FlowARError("a decoder for --fid-stats (a distance between images)", "a source without one",
                              "pass --vae (or an engine directory exported with --vae), or drop --fid-stats")
        if extractor is not None:                    # (a broken one was found after the sampling)
            probe_extractor(extractor, rt.image_size, stats[0])
        # auto: the Animal-MNIST judge for a model trained on it that makes images; token errors only without a decoder
        if judge_kind == "animal-mnist" or (judge_kind == "auto" and rt.trained.get("data") == "animal-mnist" and rt.decodes):
            if config.num_classes != 10 or not rt.decodes:
                raise FlowARError("a 10-class model with a decoder for the Animal-MNIST judge",
                                  f"{config.num_classes} classes{'' if rt.decodes else ', no decoder'}",
                                  "pass --judge none")
            from flowar.eval.judge import train_judge
            from flowar.io.files import user_cache
            given, judge_cache = judge_cache, judge_cache or user_cache("judge.safetensors")
            if not Path(judge_cache).is_file():        # (only where a judge is trained: a cache on a read-only
                try:                                   # volume was refused, unread)
                    check_writable(judge_cache, False, "--judge-cache")
                except FlowARError as e:               # (under a HOME not writable it said "--judge-cache" and "/")
                    if given:
                        raise
                    raise FlowARError("a writable place for the judge's cache ($XDG_CACHE_HOME/flowar, else "
                                      "~/.cache/flowar)", e.got, "pass --judge-cache PATH, or set XDG_CACHE_HOME to a "
                                      "folder this user may write") from None
            judge = train_judge(cache=Path(judge_cache), progress=True)
        labels = [c for c in range(min(classes_limit, config.num_classes)) for _ in range(per_class)]
        if not rt.decodes:          # (said after the sampling, 15 s later: "no images to judge")
            click.echo(f"note: no decoder, token errors only ({'pass --vae' + rt.trained.get('vae', '') if ckpt else 're-export with --vae'})", err=True)
        other = stack.enter_context(Runtime.open(vs_engine_dir, True)) if vs_engine_dir else None
        if other is not None:
            if other.config != config:
                raise FlowARError("--vs-engine-dir exported from the same model", "another config",
                                  "pass a matching one")
            if rt.decodes and not other.decodes:     # (found after the first source had sampled)
                raise FlowARError("--vs-engine-dir with a decoder, as the judged source has (images are compared)",
                                  "one exported without --vae", "re-export it with --vae")
            batch = min(batch, other.max_batch)

        def sampler(r):             # (each run's bar says which schedule: the converged reference took 94 % unnamed)
            return lambda s: r.sample(labels, s, seed=seed, batch_size=batch, decode=rt.decodes,
                                      progress={"desc": f"scales ({s.name or 'custom'} schedule)"})
        rep = measure(sampler(rt), config, labels, sched, rt.decodes, judge, judge.real_stats if judge else None,
                      converged, stats, extractor, reference=sampler(other) if other else None)
    for line in report_lines(rep, seed, rt.decodes, rt.class_names, f"{vs_engine_dir} ({other.detail})" if other else
                             None, Path(fid_stats).name if fid_stats else None, (judge_kind, rt.trained.get("data"))):
        click.echo(line)
    if json_out:
        from flowar.io.files import atomic_write_bytes
        atomic_write_bytes(json_out, lambda tmp: Path(tmp).write_text(rep.to_json()))
