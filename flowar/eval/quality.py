"""What a sampling schedule costs in quality, measured against independent references.

* Fidelity to the official sampler: token error and image PSNR against the official schedule
  (25-point Euler) with the same noise, i.e. against the images the reference code gives.
* Convergence, for any checkpoint: token error against a converged reference (Euler on a
  uniform grid of many small steps), which needs no judge.
* For the Animal-MNIST default model: class accuracy by the independent judge, and a Frechet
  distance between the judge's features of generated and of held-out real images (a domain FID).
* FID against reference statistics in the ADM / MAR format (``.npz`` with ``mu`` and ``sigma``),
  with features from a local extractor file (TorchScript, such as the Inception network of the
  StyleGAN3 / clean-fid FID code); nothing is downloaded.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from flowar.errors import FlowARError
from flowar.io.images import psnr_each, to_uint8

CONVERGED_POINTS = 401          # uniform grid of the converged reference (400 Euler steps)


# ---- Frechet distance -------------------------------------------------------------------------

def feature_stats(features_BD: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) in float64, the unbiased estimate FID tools use."""
    f = features_BD.detach().double().cpu().numpy()
    if f.shape[0] < 2:
        raise FlowARError("at least 2 samples for feature statistics", f"{f.shape[0]}", "sample more images")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by symmetric eigendecompositions.

    (The matrix square root of S1 S2 has the trace of that of the symmetric S1^1/2 S2 S1^1/2,
    which eigh computes stably; tiny negative eigenvalues from rounding are clipped to 0.)
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise FlowARError("statistics of the same feature size", f"mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / "
                          f"{s2.shape}", "use reference statistics made with the same feature extractor")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt))   # >= 0


def read_fid_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` and ``sigma`` from an ADM / MAR / torch-fidelity style ``.npz`` (no pickled objects)."""
    p = Path(path)
    if not p.is_file():
        raise FlowARError("a reference statistics file (.npz with mu and sigma)", f"no file at {p}", "check --fid-stats")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise FlowARError("arrays mu and sigma in the statistics file", f"{p.name} with {sorted(z.files)}",
                                  "pass FID reference statistics (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        bad = int((~np.isfinite(mu)).sum() + (~np.isfinite(sigma)).sum())
        if bad:                        # (NaN statistics gave "FID ...: 0.000", exit 0)
            raise FlowARError("finite mu and sigma in the statistics file", f"{p.name} with {bad} values NaN or inf",
                              "make the statistics again, or fetch the file again")
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):       # (mu (1, 64) was "an extractor of feature size 1")
            raise FlowARError("mu of shape (D,) and sigma of (D, D) in the statistics file", f"{p.name} with mu "
                              f"{mu.shape} and sigma {sigma.shape}", "make the statistics again, or fetch the file again")
        w = np.linalg.eigvalsh((sigma + sigma.T) / 2)   # (a covariance: sigma = -I gave "FID: 0.000", exit 0)
        if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-12) or w.min(initial=0) < -1e-6 * max(1.0, abs(w).max(initial=0)):
            raise FlowARError("a covariance sigma (symmetric, no eigenvalue below zero) in the statistics file",
                              f"{p.name}: smallest eigenvalue {w.min(initial=0):.3g}", "make the statistics again, or fetch "
                              "the file again")
        return mu, sigma
    except FlowARError:
        raise
    except Exception as e:   # noqa: BLE001 - any unreadable file is one user error
        # (not numpy's own message for a file that is no .npz: it advised loading it with pickles allowed)
        said = "not an .npz archive of arrays" if "allow_pickle" in str(e) else textwrap.shorten(str(e), 160)
        raise FlowARError("a readable .npz statistics file (arrays mu and sigma)", f"{p}: {said}",
                          "pass FID reference statistics (e.g. ADM's VIRTUAL_imagenet256_labeled.npz), or fetch the "
                          "file again") from e


def load_extractor(path: str | Path) -> Callable[[Tensor], Tensor]:
    """A feature extractor from a file: uint8 images (B, 3, H, W) -> features (B, D).

    ``.pt2``: a ``torch.export`` program; otherwise TorchScript (the format of the StyleGAN3 /
    clean-fid Inception, which is called with ``return_features=True`` so that it returns pool
    features rather than logits; so is any extractor whose forward takes that flag).
    """
    import inspect
    import warnings
    p = Path(path)
    if not p.is_file():
        raise FlowARError("a feature extractor file (TorchScript or .pt2)", f"no file at {p}", "check --fid-extractor")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)      # torch.jit is deprecated, its files are not
            if p.suffix == ".pt2":
                net = torch.export.load(str(p)).module()
                flag = "return_features" in inspect.signature(net.forward).parameters
            else:
                net = torch.jit.load(str(p), map_location="cpu").eval()
                flag = "return_features" in [a.name for a in net.forward.schema.arguments]
    except Exception as e:   # noqa: BLE001
        raise FlowARError("a feature extractor file (TorchScript, or torch.export .pt2)",
                          f"{p.name}: {textwrap.shorten(str(e), 160)}", "pass e.g. the inception-2015-12-05.pt of the StyleGAN3 FID code") from e

    @torch.no_grad()
    def extract(images_uint8: Tensor) -> Tensor:
        # (an extractor that raised, took other arguments or gave NaN was a traceback after the sampling)
        expected = "a feature extractor that maps uint8 images (B, 3, H, W) to finite features"
        try:
            out = (net(images_uint8, return_features=True) if flag else net(images_uint8)).flatten(1).double()
        except Exception as e:   # noqa: BLE001 - the user's file: its failure is one line
            why = (str(e).strip().splitlines() or ["?"])[-1][:160]      # (TorchScript's says where first, why last)
            raise FlowARError(expected, f"{p.name} failed: {type(e).__name__}: {why}",
                              "pass e.g. the inception-2015-12-05.pt of the StyleGAN3 FID code") from e
        if not torch.isfinite(out).all():
            raise FlowARError(expected, f"{p.name} gave NaN or inf", "check the extractor, or pass another")
        return out
    return extract


def probe_extractor(extract: Callable[[Tensor], Tensor], image_size: int, stats_mu: np.ndarray) -> None:
    """Run ``extract`` on two blank images of the source's size before any sampling: an extractor that
    fails on them, or whose features are not the size of the statistics', is refused now (it was
    found after the whole sampling)."""
    got = extract(torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8))
    if got.shape[1:] != stats_mu.shape:
        raise FlowARError(f"an extractor of the statistics' feature size ({stats_mu.shape[0]})",
                          f"{got.shape[1]} features from {image_size}x{image_size} images",
                          "pass the extractor the statistics were made with")


# ---- comparing two samplings of one request ----------------------------------------------------

def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(got - ref) / rms(ref): the error relative to the output's own scale."""
    if not ref.numel():
        return 0.0
    d = float((got.double() - ref.double()).pow(2).mean().sqrt())
    scale = float(ref.double().pow(2).mean().sqrt())
    e = d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))
    return e if e == e else float("inf")


def deviation(got, ref) -> dict:
    """How far one sampling of a request is from another of the same labels and noise: token
    errors (max, mean, relative rms) and, with images, PSNR per image (median, worst)."""
    d = (got.tokens - ref.tokens).abs()
    out = {"token_max": float(d.max()), "token_mean": float(d.mean()), "token_rel": relative_error(got.tokens, ref.tokens)}
    if got.images is not None and ref.images is not None:
        ps = sorted(psnr_each(got.images, ref.images))
        out |= {"psnr_median": ps[len(ps) // 2], "psnr_worst": ps[0]}
    return out


# ---- measuring a schedule ----------------------------------------------------------------------

@dataclass(slots=True)
class QualityReport:
    schedule: str
    head_evals: int                  # head evaluations per sample
    n_samples: int
    seconds: float                   # sampling time of the measured schedule (all samples, decode included)
    vs_official: dict = field(default_factory=dict)    # token_max, token_mean, psnr_median, psnr_worst
    vs_converged: dict = field(default_factory=dict)   # token_max, token_mean
    vs_reference: dict = field(default_factory=dict)   # against other stages (e.g. fp32 engines), same schedule
    class_accuracy: float | None = None
    per_class: list[float] = field(default_factory=list)
    judge_held_out_accuracy: float | None = None
    frechet_judge: float | None = None                  # generated vs held-out real, judge features
    fid: float | None = None                            # against --fid-stats

    def to_json(self) -> str:
        """Strict JSON: a non-finite number (the PSNR of identical images, inf) as a string ("inf";
        json wrote Infinity, which parsers refuse)."""
        import dataclasses
        import json

        from flowar.io.digests import strict_json
        return json.dumps(strict_json(dataclasses.asdict(self)), indent=1, allow_nan=False)


Sampler = Callable[..., object]     # (schedule) -> the request's SampleResult (same labels and seeds each time)


def stages_sampler(stages, config, labels: list[int], seed: int = 0, batch: int | None = None, decode: bool = True,
                   progress: bool = False) -> Sampler:
    """A :data:`Sampler` over sampler stages (tests, benches); commands pass ``FlowARPipeline.sample``."""
    from flowar.sampling.batches import run_sampling

    def run(schedule):
        with torch.inference_mode():
            return run_sampling(stages, config, labels, schedule, seed, decode=decode, batch_size=batch,
                                progress=progress)
    return run


def measure(sample: Sampler, config, labels: list[int], schedule, decode: bool = True, judge=None,
            real_judge_stats=None, converged: bool = False, fid_stats=None, extractor=None,
            reference: Sampler | None = None) -> QualityReport:
    """Sample ``labels`` with ``schedule`` through ``sample`` and compare as the module says.

    ``sample(schedule)`` gives the request's result with any schedule (the same labels and
    per-sample noise each time); ``reference`` samples the same request on other engines.
    """
    from flowar.sampling.schedule import Settings, build_schedule
    run = sample

    res = run(schedule)
    rep = QualityReport(schedule.describe(), schedule.head_evals, len(labels), res.seconds)
    official = Settings(schedule="official", cfg=schedule.cfg, guidance=schedule.guidance).resolve(config.n_scales)
    is_official = schedule.plan == official.plan
    ref = res if is_official else run(official)
    if not is_official:                      # the official schedule has nothing to be compared with here
        rep.vs_official = deviation(res, ref)
    if reference is not None:
        rep.vs_reference = deviation(res, reference(schedule))
    if converged:
        conv = run(build_schedule(CONVERGED_POINTS, schedule.cfg, schedule.guidance, config.n_scales, "euler", "uniform",
                                  name="converged reference"))
        d = (res.tokens - conv.tokens).abs()
        rep.vs_converged = {"token_max": float(d.max()), "token_mean": float(d.mean()),
                            "official_token_mean": float((ref.tokens - conv.tokens).abs().mean())}
    if judge is not None and decode:
        y = torch.tensor(labels)
        pred = judge.classify(res.images)
        ok = (pred == y).float()
        rep.class_accuracy = round(float(ok.mean()), 6)        # (float32's 0.800000011920929 in the JSON)
        rep.per_class = [round(float(ok[y == c].mean()), 6) for c in range(config.num_classes) if (y == c).any()]
        rep.judge_held_out_accuracy = round(float(judge.held_out_accuracy), 6)
        if real_judge_stats is not None:
            rep.frechet_judge = frechet_distance(*feature_stats(judge.features(res.images)), *real_judge_stats)
    if fid_stats is not None and extractor is not None and decode:
        u8 = torch.from_numpy(to_uint8(res.images)).permute(0, 3, 1, 2)      # (B, 3, H, W) uint8, as the PNGs
        feats = torch.cat([extractor(u8[i:i + 50]) for i in range(0, len(u8), 50)])
        rep.fid = frechet_distance(*feature_stats(feats), *fid_stats)
    return rep


def report_lines(rep: "QualityReport", seed: int, decode: bool, class_names: list[str] | None,
                 reference: str | None = None, fid_name: str | None = None,
                 judged: tuple[str, str | None] = ("auto", None)) -> list[str]:
    """What flowar-judge prints for a report (``judged``: its --judge and the source's training data,
    which say why images had no class accuracy: it ended with exit 0 without a word)."""
    out = [f"schedule: {rep.schedule}; {rep.n_samples} samples, seed {seed}, sampled in {rep.seconds:.1f} s"]

    def versus(what: str, d: dict) -> str:
        return (f"vs {what}: tokens max {d['token_max']:.2e} mean {d['token_mean']:.2e}"
                + (f"; image PSNR median {d['psnr_median']:.1f} dB, worst {d['psnr_worst']:.1f} dB" if decode else ""))
    if rep.vs_official or not rep.vs_reference:     # (the hint said to pass --vs-engine-dir where it had been passed)
        out.append(versus("the official schedule (same noise)", rep.vs_official) if rep.vs_official else
                   "this is the official schedule (compare other engines with --vs-engine-dir, or another --schedule)")
    if rep.vs_reference:
        out.append(versus(f"{reference}, same samples", rep.vs_reference))
    if rep.vs_converged:
        c = rep.vs_converged
        out.append(f"vs a converged reference ({CONVERGED_POINTS - 1} Euler steps): tokens mean {c['token_mean']:.2e} (the official "
                   f"schedule's: {c['official_token_mean']:.2e}), max {c['token_max']:.2e}")
    if rep.class_accuracy is not None:
        # the Wilson score interval (95 %) of a share of n images: "0.0 %" of 20 images is not a model that never hits
        n, a, z2 = rep.n_samples, rep.class_accuracy, 1.96 ** 2
        mid, half = (a + z2 / (2 * n)) / (1 + z2 / n), 1.96 * math.sqrt(a * (1 - a) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        out.append(f"judge (held-out accuracy on real images {rep.judge_held_out_accuracy:.1%}): "
                   f"{a:.1%} judged the requested class (95 % interval {max(0.0, mid - half):.1%}-{min(1.0, mid + half):.1%} "
                   f"over {n} images); Frechet distance to held-out real images in its features {rep.frechet_judge:.2f}")
        names = class_names or [str(i) for i in range(10)]
        out.append("  " + ", ".join(f"{n} {a:.0%}" for n, a in zip(names, rep.per_class)))
    elif not decode:                                   # (nothing was said: the accuracy left out in silence)
        out.append("no images to judge: the source has no decoder (pass --vae, or an engine directory exported with "
                   "--vae), token errors only")
    else:
        kind, data = judged
        out.append("no class accuracy: " + ("--judge none" if kind == "none" else (f"no judge of {data}" if data else
                   "the source records no training data") + ("; --judge animal-mnist judges Animal-MNIST's" if
                   len(class_names or ()) == 10 else "")))      # (that judge takes 10 classes)
    if rep.fid is not None:
        out.append(f"FID against {fid_name}: {rep.fid:.3f}" + (f" (from {rep.n_samples} samples: biased high, not "
                   "comparable with published FIDs, which use 10k-50k)" if rep.n_samples < 10_000 else ""))
    return out
