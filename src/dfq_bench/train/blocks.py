"""Block reconstruction (BRECQ / QDrop / GENIE-M style): a quantized model is optimised block by block
to reproduce its float teacher's block outputs, with learned rounding (``core.learn.SoftRoundWeight``)
and learned activation step sizes (``core.learn.LsqActQuant``). The training loop of the ``train``
stage; ``methods/genie.py`` composes it. ``cfg`` is the method's config (steps, batch_size, learning
rates, round_weight, beta_start/end, warmup, drop_p, init_samples).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dfq_bench.core.learn import LsqActQuant, SoftRoundWeight, to_act_quant
from dfq_bench.core.modules import QuantLayer, quant_layers


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, x: Tensor, batch_size: int,
            output: bool) -> tuple[Tensor, Tensor | None]:
    """Input (and output) of ``module`` when ``model`` runs on ``x``, in chunks; the pass stops at
    ``module``."""
    ins, outs = [], []

    def pre(mod, args):
        if len(args) != 1:
            raise RuntimeError(f"genie: block {type(mod).__name__} takes {len(args)} inputs; only 1 is supported")
        ins.append(args[0].detach())
        if not output:
            raise _Stop

    def post(mod, args, out):
        outs.append(out.detach())
        raise _Stop

    handles = [module.register_forward_pre_hook(pre)]
    if output:
        handles.append(module.register_forward_hook(post))
    try:
        for chunk in torch.split(x, batch_size):
            try:
                model(chunk)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(ins) != len(torch.split(x, batch_size)):
        raise RuntimeError(f"genie: block {type(module).__name__} is not reached by the forward pass")
    return torch.cat(ins), (torch.cat(outs) if output else None)


def find_blocks(qmodel: nn.Module, block_types: list[str], layer_order: list[str]) -> list[tuple[str, nn.Module]]:
    """BRECQ blocks: outermost modules whose class name is in ``block_types`` and that hold a
    QuantLayer; every QuantLayer outside them is its own block. Sorted by execution order."""
    layers = quant_layers(qmodel)
    blocks, covered = [], set()
    for name, m in qmodel.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        if type(m).__name__ in block_types and any(isinstance(x, QuantLayer) for x in m.modules()):
            blocks.append((name, m))
            covered.add(name)
    for name, m in layers.items():
        if not any(name.startswith(c + ".") for c in covered):
            blocks.append((name, m))
    rank = {n: i for i, n in enumerate(layer_order)}

    def first_layer(item):
        name, m = item
        inside = [n for n in layers if n == name or n.startswith(name + ".")]
        return min(rank[n] for n in inside)

    return sorted(blocks, key=first_layer)


def beta_at(step: int, steps: int, warmup: float, start: float, end: float) -> float:
    """AdaRound's temperature: ``start`` during warm-up, then linear to ``end``."""
    t0 = warmup * steps
    if step < t0:
        return start
    return end + (start - end) * max(0.0, 1.0 - (step - t0) / max(steps - t0, 1))


@torch.no_grad()
def block_loss(block: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Mean over images (and positions) of the per-position squared error summed over channels."""
    total, n = 0.0, 0
    for xb, yb in zip(torch.split(x, batch_size), torch.split(y, batch_size), strict=True):
        err = (block(xb) - yb).pow(2).sum(1)
        total += float(err.mean()) * len(xb)
        n += len(xb)
    return total / n


def _set_train_quantizers(block: nn.Module, train: bool) -> tuple[list[SoftRoundWeight], list[LsqActQuant]]:
    soft = [m for m in block.modules() if isinstance(m, SoftRoundWeight)]
    acts = [m for m in block.modules() if isinstance(m, LsqActQuant)]
    for m in soft:
        m.hard = not train
    for m in acts:
        m.train(train)
    return soft, acts


@torch.enable_grad()
def reconstruct_block(block: nn.Module, x_fp: Tensor, x_q: Tensor, y: Tensor, cfg, seed: int) -> dict:
    """GENIE-M on one block whose layers carry ``SoftRoundWeight``/``LsqActQuant``: initialises the
    activation step sizes, optimizes, and leaves the block in hard-rounding eval state (quantizers not
    yet frozen: see ``finalize_block``). Returns the block loss after init (round to nearest on the
    searched grids) and after reconstruction."""
    device = x_q.device
    g_idx = torch.Generator().manual_seed(seed)
    g_mask = torch.Generator(device=device).manual_seed(seed)
    soft, acts = _set_train_quantizers(block, train=False)
    for a in acts:
        a.generator = g_mask
    with torch.no_grad():
        block(x_q[: cfg.init_samples])  # each activation quantizer sets its grid on its first input
    loss_init = block_loss(block, x_q, y)
    soft, acts = _set_train_quantizers(block, train=True)
    opt_round = torch.optim.Adam([m.logit for m in soft], lr=cfg.lr_round) if soft else None
    scale_groups = [{"params": [m.scale for m in soft], "lr": cfg.lr_w_scale},
                    {"params": [a.scale for a in acts], "lr": cfg.lr_a_scale}]
    scale_groups = [grp for grp in scale_groups if grp["params"]]
    opt_scale = torch.optim.Adam(scale_groups) if scale_groups else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_scale, T_max=cfg.steps) if opt_scale else None
    n = len(x_q)
    bs = min(cfg.batch_size, n)
    perm, pos = torch.randperm(n, generator=g_idx), 0
    for step in range(cfg.steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g_idx), 0
        idx = perm[pos:pos + bs].to(device)
        pos += bs
        xq, xf = x_q[idx], x_fp[idx]
        if cfg.drop_p > 0:
            keep_q = torch.rand(xq.shape, generator=g_mask, device=device) < 0.5
            xq = torch.where(keep_q, xq, xf)
        rec = (block(xq) - y[idx]).pow(2).sum(1).mean()
        loss = rec
        if soft and step >= cfg.warmup * cfg.steps:
            beta = beta_at(step, cfg.steps, cfg.warmup, cfg.beta_start, cfg.beta_end)
            loss = loss + cfg.round_weight * sum(m.round_loss(beta) for m in soft)
        for opt in (opt_round, opt_scale):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in (opt_round, opt_scale):
            if opt is not None:
                opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():  # a step size must stay positive
            for m in [*soft, *acts]:
                m.scale.clamp_(min=1e-8)
    _set_train_quantizers(block, train=False)
    return {"loss_init": loss_init, "loss_final": block_loss(block, x_q, y)}


def finalize_block(block: nn.Module) -> None:
    """Hard weights on their learned grids (QuantLayer buffers updated), frozen ActQuants."""
    for ql in [m for m in block.modules() if isinstance(m, QuantLayer)]:
        layer = ql.layer
        if parametrize.is_parametrized(layer, "weight"):
            soft = layer.parametrizations.weight[0]
            soft.hard = True
            with torch.no_grad():
                ql.w_scale.copy_(soft.scale.detach())
                ql.w_zero_point.copy_(soft.zero_point)
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            layer.weight.requires_grad_(False)
        if isinstance(ql.act_quant, LsqActQuant):
            ql.act_quant = to_act_quant(ql.act_quant)
