"""Training-step throughput and peak memory of the brain, and policy rollout speed.

    python benchmarks/bench_brain.py                          # tiny on the CPU
    python benchmarks/bench_brain.py --preset base --device cuda --modes fp32 bf16 bf16+compile

A training step is what most stages do: forward(text, img) (text logits seeing the image, the image rebuilt
seeing the text), MSE + next-token loss, backward, AdamW. Rollout: the brain playing B bare-scene games
(sampling, frames rendered on the device), counted in game steps per second.
"""
import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402
import game  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(cfg, device, batch, mode, iters):
    torch.manual_seed(0)
    brain = core.Brain(cfg).to(device)
    if "compile" in mode:
        for m in brain.modules():
            if isinstance(m, core.Block):
                m.compile()
    opt = torch.optim.AdamW(brain.parameters(), lr=1e-4)
    img = torch.rand(batch, 3, cfg.img_size, cfg.img_size, device=device)
    text = torch.randint(len(core.SPECIALS), cfg.vocab, (batch, cfg.seq_len), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in mode)

    def step():
        with amp:
            logits, recon = brain(text, img)
        loss = F.mse_loss(recon.float(), img) + F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), text[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):                               # warm-up (and compilation)
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.time()
    for _ in range(iters):
        step()
    sync(device)
    dt = (time.time() - t) / iters
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    return batch / dt, dt, peak


def bench_rollout(cfg, device, games, mode):
    torch.manual_seed(0)
    brain = core.Brain(cfg).to(device)
    scenes = [game.random_bare_settings(i, max_agent_offset=0.5) for i in range(games)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in mode)
    with amp:
        core.rollout(scenes[: min(8, games)], "sample", cfg.img_size, device, brain=brain)     # warm-up
        sync(device)
        t = time.time()
        r = core.rollout(scenes, "sample", cfg.img_size, device, brain=brain,
                         generator=torch.Generator(device=device).manual_seed(0))
        sync(device)
    return r.steps.sum().item() / (time.time() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(core.PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=["fp32"], help="fp32, bf16, fp32+compile, bf16+compile")
    p.add_argument("--rollout-games", type=int, default=64, help="games played at once in the rollout benchmark (0: skip)")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = core.make_config(args.preset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"preset {args.preset}: {core.count_parameters(core.Brain(cfg)) / 1e6:.1f}M parameters, "
          f"batch {args.batch_size}, on {name}")
    print(f"{'mode':<14}{'samples/s':>11}{'s/step':>9}{'peak GiB':>10}{'rollout steps/s':>17}")
    for mode in args.modes:
        rate, dt, peak = bench_step(cfg, device, args.batch_size, mode, args.iters)
        roll = bench_rollout(cfg, device, args.rollout_games, mode) if args.rollout_games else float("nan")
        print(f"{mode:<14}{rate:>11.1f}{dt:>9.3f}{peak:>10.2f}{roll:>17.0f}", flush=True)


if __name__ == "__main__":
    main()
