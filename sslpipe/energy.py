"""``sslpipe energy``: four ways to shape an energy, trained on 2-D points and drawn as landscapes.

Every sslpipe method is an energy model: it makes E(y) low where the data is and must keep it high
elsewhere. The four panels are the two strategies side by side, on data small enough to see:

- architectural: K-means (a latent-variable model; E is the free energy minimised over a discrete code)
  and a denoising autoencoder (E is the reconstruction error; capacity limits the low-energy volume);
- contrastive: an energy network trained with InfoNCE against explicit wide negatives (the form of
  MoCo's loss against its queue), and one trained by contrastive divergence with Langevin negatives.

Everything runs on one CPU core in seconds and is deterministic under ``--seed``.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BOX = 3.0  # plots and the uniform reference points cover [-BOX, BOX]^2; the data fills its inner 3/4
DATASETS = ("spiral", "moons", "rings")
EnergyFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 2) points -> (N,) energies


# ----------------------------------------------------------------------------------------------- data
def make_data(name: str, num_points: int, noise: float, seed: int) -> torch.Tensor:
    """``(num_points, 2)`` float32 points of a 2-D toy set, centred and scaled to ``[-0.75 BOX, 0.75 BOX]``.

    ``noise`` is the std of Gaussian jitter added after scaling (in plot units).
    """
    rng = np.random.default_rng(seed)
    if name == "spiral":  # two point-symmetric arms; sqrt spacing gives a uniform density along the arm
        t = np.sqrt(rng.uniform(0.03, 1.0, num_points)) * 3 * np.pi
        arm = rng.integers(0, 2, num_points) * 2 - 1
        x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) * arm[:, None]
    elif name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(num_points, noise=0.0, random_state=seed)
    elif name == "rings":
        radius = rng.choice([1.0, 2.0], num_points)
        angle = rng.uniform(0, 2 * np.pi, num_points)
        x = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    else:
        raise ValueError(f"unknown data {name!r}; choose one of {DATASETS}")
    x = x - x.mean(axis=0)
    x = x / np.abs(x).max() * 0.75 * BOX + noise * rng.standard_normal(x.shape)
    return torch.from_numpy(x.astype(np.float32))


def uniform_box(num_points: int, seed: int, half_width: float = BOX) -> torch.Tensor:
    """``(num_points, 2)`` points uniform over ``[-half_width, half_width]^2``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num_points, 2, generator=g) * 2 - 1) * half_width


class FourierMLP(nn.Module):
    """A small MLP on [y, sin(By), cos(By)] with a fixed random B: a plain MLP blurs the spiral's arms
    (spectral bias); the Fourier features let it resolve them in a few hundred steps (Tancik et al., 2020).
    SiLU keeps it smooth, so Langevin dynamics has useful gradients."""

    def __init__(self, out_features: int, hidden: int = 64, num_frequencies: int = 32, frequency_std: float = 2.0):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(2, num_frequencies) * frequency_std)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * num_frequencies, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        phase = y @ self.frequencies
        return self.net(torch.cat([y, phase.sin(), phase.cos()], dim=1))


# -------------------------------------------------------------------- K-means (architectural, latent code)
def kmeans_code_energies(y: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` energy of each point with each code: E(y, z=k) = ||y - w_k||^2."""
    return ((y[:, None, :] - centroids[None, :, :]) ** 2).sum(dim=-1)


def kmeans_energy(y: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(N,)`` free energy of K-means: the code energy minimised over the discrete code, min_k ||y - w_k||^2."""
    return kmeans_code_energies(y, centroids).min(dim=1).values


def fit_kmeans(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``(k, 2)`` K-means centroids of ``x`` (faiss, Lloyd's algorithm with a few restarts)."""
    import faiss

    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}] (the number of training points), got {k}")
    faiss.omp_set_num_threads(torch.get_num_threads())  # faiss follows --threads too
    km = faiss.Kmeans(2, k, niter=50, nredo=3, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(x.numpy(), dtype=np.float32))
    return torch.from_numpy(km.centroids.copy())


# ---------------------------------------------------------- denoising autoencoder (architectural/regularised)
def dae_energy(y: torch.Tensor, decoder: nn.Module) -> torch.Tensor:
    """``(N,)`` reconstruction energy of the clean point: E(y) = ||y - g(y)||^2."""
    return ((y - decoder(y)) ** 2).sum(dim=1)


def train_dae(
    x: torch.Tensor,
    steps: int,
    seed: int,
    batch_size: int = 512,
    sigma_range: tuple[float, float] = (0.05, 1.0),
    lr: float = 3e-3,
) -> nn.Module:
    """An MLP g trained to map corrupted points x + sigma * eps back onto x (Adam).

    sigma is log-uniform in ``sigma_range`` per point and each error is weighted by 1 / sigma^2: small noise
    teaches g the data's thin shape, large noise teaches it to pull far points in (so the error grows away
    from the data), and the weight keeps the large-noise errors from drowning the small ones.
    """
    log_lo, log_hi = math.log(sigma_range[0]), math.log(sigma_range[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = FourierMLP(2)
        opt = torch.optim.Adam(g.parameters(), lr=lr)
        for _ in range(steps):
            batch = x[torch.randint(len(x), (batch_size,))]
            sigma = (torch.rand(batch_size, 1) * (log_hi - log_lo) + log_lo).exp()
            error = ((g(batch + sigma * torch.randn_like(batch)) - batch) ** 2).sum(dim=1, keepdim=True)
            loss = (error / sigma**2).mean() * sigma_range[0] ** 2  # scaled back to the smallest noise's units
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return g.eval()


# ------------------------------------------------------------------ contrastive with explicit negatives
def infonce_energy_loss(positive_energy: torch.Tensor, negative_energy: torch.Tensor) -> torch.Tensor:
    """InfoNCE over energies: each data point's logit -E(x_i) against the shared negatives' -E(n_1..K).

    This is the InfoNCE form of ``sslpipe.losses`` (MoCo: one positive at column 0 against a queue of K
    shared negatives, cross entropy with label 0), written here for scalar energies instead of cosines.
    """
    n = positive_energy.shape[0]
    logits = torch.cat([-positive_energy[:, None], -negative_energy[None, :].expand(n, -1)], dim=1)
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=logits.device))


def train_infonce(
    x: torch.Tensor,
    steps: int,
    seed: int,
    batch_size: int = 512,
    num_negatives: int = 512,
    negative_box: float = 4 / 3 * BOX,
    lr: float = 3e-3,
) -> nn.Module:
    """An energy MLP (scalar out) trained by :func:`infonce_energy_loss`; negatives uniform over an enlarged box."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        energy = FourierMLP(1)
        opt = torch.optim.Adam(energy.parameters(), lr=lr)
        for _ in range(steps):
            batch = x[torch.randint(len(x), (batch_size,))]
            negatives = (torch.rand(num_negatives, 2) * 2 - 1) * negative_box
            loss = infonce_energy_loss(energy(batch).squeeze(1), energy(negatives).squeeze(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return energy.eval()


# ------------------------------------------------------------------- contrastive divergence (Langevin)
def langevin(energy: EnergyFn, y: torch.Tensor, steps: int, step_size: float, noise_scale: float) -> torch.Tensor:
    """``steps`` of Langevin dynamics from ``y``: y <- y - step_size * dE/dy + noise_scale * N(0, I).

    Step size and noise are separate knobs, as in Du & Mordatch (2019); the result is detached.
    """
    y = y.detach()
    for _ in range(steps):
        y.requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(y).sum(), y)
        y = (y - step_size * grad + noise_scale * torch.randn_like(y)).detach()
    return y


def train_cd(
    x: torch.Tensor,
    steps: int,
    seed: int,
    batch_size: int = 256,
    langevin_steps: int = 5,
    step_size: float = 0.1,
    noise_scale: float = 0.3,
    regulariser: float = 0.01,
    lr: float = 3e-3,
) -> tuple[nn.Module, torch.Tensor]:
    """An energy MLP trained by contrastive divergence; returns it and the negatives' mean energy per step.

    Negatives start at data points and take ``langevin_steps`` Langevin steps on the current energy; the
    loss lowers E(data), raises E(negatives), and ``regulariser * (E(data)^2 + E(neg)^2)`` keeps it bounded.
    """
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        energy = FourierMLP(1)
        opt = torch.optim.Adam(energy.parameters(), lr=lr)

        def scalar_energy(y: torch.Tensor) -> torch.Tensor:
            return energy(y).squeeze(1)

        for _ in range(steps):
            batch = x[torch.randint(len(x), (batch_size,))]
            negatives = langevin(scalar_energy, batch, langevin_steps, step_size, noise_scale)
            e_pos, e_neg = scalar_energy(batch), scalar_energy(negatives)
            loss = e_pos.mean() - e_neg.mean() + regulariser * (e_pos**2 + e_neg**2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(e_neg.detach().mean())
    return energy.eval(), torch.stack(history)


# ------------------------------------------------------------------------------------- command and plot
def _default(fn: Callable, name: str):
    return inspect.signature(fn).parameters[name].default


FAMILIES = {  # key -> the panel's first two title lines
    "kmeans": "K-means (k={k}), architectural\nE(y) = min_k ||y - w_k||²: free energy over code k",
    "dae": "Denoising autoencoder, architectural\nE(y) = ||y - g(y)||²: g learned to undo noise",
    "infonce": "Contrastive: InfoNCE, uniform negatives\n"
    f"E = MLP(y): data vs {_default(train_infonce, 'num_negatives')} wide negatives",
    "cd": "Contrastive divergence: Langevin negatives\n"
    f"E = MLP(y): negatives = {_default(train_cd, 'langevin_steps')} noisy descent steps",
}


def train_all(train: torch.Tensor, steps: int, k: int, seed: int) -> tuple[dict[str, EnergyFn], torch.Tensor]:
    """Fit one model of each family; returns their energy functions and CD's per-step negative energy."""
    centroids = fit_kmeans(train, k, seed)
    decoder = train_dae(train, steps, seed=seed)
    contrastive = train_infonce(train, steps, seed=seed)
    divergence, negative_energy = train_cd(train, steps, seed=seed)
    energies = {
        "kmeans": lambda y: kmeans_energy(y, centroids),
        "dae": lambda y: dae_energy(y, decoder),
        "infonce": lambda y: contrastive(y).squeeze(1),
        "cd": lambda y: divergence(y).squeeze(1),
    }
    return energies, negative_energy


def plot_landscapes(
    energies: dict[str, EnergyFn], train: torch.Tensor, numbers: dict[str, dict], k: int, path: str, title: str
) -> None:
    """A 2x2 grid of energy surfaces over [-BOX, BOX]^2 with contours and the training points on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    side = torch.linspace(-BOX, BOX, 161)
    gy, gx = torch.meshgrid(side, side, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 10.5), constrained_layout=True)
    for ax, (name, energy) in zip(axes.flat, energies.items()):
        with torch.no_grad():
            surface = energy(grid).reshape(gx.shape).numpy()
        # Scales differ by family and most of the range sits far from the data: levels at the panel's own
        # quantiles give each colour band the same area, so the wells near the data show as well as the walls.
        levels = np.unique(np.quantile(surface, np.linspace(0, 1, 17)))
        norm = matplotlib.colors.BoundaryNorm(levels, 256)
        image = ax.contourf(gx, gy, surface, levels=levels, cmap="viridis", norm=norm)
        ax.contour(gx, gy, surface, levels=levels[1:-1], colors="white", linewidths=0.5, alpha=0.6, linestyles="solid")
        ax.scatter(train[:, 0], train[:, 1], s=2, c="red", alpha=0.6, linewidths=0)
        n = numbers[name]
        measured = f"mean E: held-out data {n['data_energy']:.3g} | uniform box {n['uniform_energy']:.3g}"
        ax.set_title(f"{FAMILIES[name].format(k=k)}\n{measured}", fontsize=10)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8, label="energy (each band: 1/16 of the area)", format="%.2g")
    fig.suptitle(title, fontsize=12)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    plt.close(fig)
    # A 256-colour palette keeps the PNG small (it is committed to docs/) with no visible loss.
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


def run_energy(
    data: str = "spiral",
    output: Optional[str] = None,
    root: str = "runs",
    k: int = 20,
    seed: int = 0,
    num_points: int = 3000,
    noise: float = 0.1,
    steps: int = 600,
    threads: int = 1,
) -> str:
    """Train one model of each family on 2-D points, write ``energy_landscapes.png`` and ``energy.json``.

    Args:
        data: toy data set: spiral, moons or rings.
        output: folder to write into (default: a new run directory under ``root``).
        root: parent of the default run directory.
        k: number of K-means centroids.
        seed: seeds the data, the initialisations, the noise and the negatives.
        num_points: points generated; 80% train the models, 20% are held out to measure the energy.
        noise: std of the Gaussian jitter on the data (the data fills [-2.25, 2.25]^2).
        steps: Adam steps of each neural model (batches of 512 points, 256 for contrastive divergence).
        threads: torch CPU threads.
    """
    from sslpipe.runs import make_run_dir

    if data not in DATASETS:
        raise ValueError(f"unknown --data {data!r}; choose one of {DATASETS}")
    start, previous_threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        points = make_data(data, num_points, noise, seed)
        num_train = int(0.8 * num_points)
        train, held_out = points[:num_train], points[num_train:]
        uniform = uniform_box(len(held_out), seed + 1)
        energies, negative_energy = train_all(train, steps, k, seed)
        numbers: dict[str, dict] = {}
        with torch.no_grad():
            for name, energy in energies.items():
                numbers[name] = {
                    "data_energy": float(energy(held_out).mean()),
                    "uniform_energy": float(energy(uniform).mean()),
                }
    finally:
        torch.set_num_threads(previous_threads)
    window = max(1, len(negative_energy) // 20)  # first and last 5% of the steps
    numbers["cd"]["negative_energy_start"] = float(negative_energy[:window].mean())
    numbers["cd"]["negative_energy_end"] = float(negative_energy[-window:].mean())

    out = output or make_run_dir(root, ["energy", data])
    os.makedirs(out, exist_ok=True)
    title = (
        f"Energy E(y) of four models trained on '{data}' (red dots: training points, seed {seed})\n"
        "dark = low energy; each panel has its own scale, with levels at its quantiles (equal areas)"
    )
    plot_landscapes(energies, train, numbers, k, os.path.join(out, "energy_landscapes.png"), title)
    settings = dict(data=data, k=k, seed=seed, num_points=num_points, noise=noise, steps=steps)
    with open(os.path.join(out, "energy.json"), "w") as f:
        json.dump({**settings, "families": numbers}, f, indent=2)

    print(f"{'family':<10}{'E held-out data':>17}{'E uniform box':>15}")
    for name, n in numbers.items():
        print(f"{name:<10}{n['data_energy']:>17.3f}{n['uniform_energy']:>15.3f}")
    cd = numbers["cd"]
    start_end = f"{cd['negative_energy_start']:.3f} (start) -> {cd['negative_energy_end']:.3f} (end)"
    print(f"CD Langevin negatives' energy: {start_end}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return out


def main(argv: Sequence[str]) -> str:
    """``sslpipe energy [--data spiral|moons|rings] [--output DIR] [--k K] [--seed S] ...``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="sslpipe energy", description=run_energy.__doc__.splitlines()[0])
    parser.add_function_arguments(run_energy)
    cfg = parser.parse_args(list(argv))
    return run_energy(**cfg.as_dict())
