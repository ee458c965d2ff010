"""Benchmark of game.py: frames/s and steps/s, against a one-scene-at-a-time Pillow rasterizer.

    python benchmarks/bench_game.py                  # CPU (1 thread and torch's default), and CUDA if present
    python benchmarks/bench_game.py --device cuda    # CUDA only (the Pillow reference still runs on the CPU)

Prints a table; not a test. The original drew with pygame on one CPU core: about 1,700 new
224 px frames/s, 2,300 steps/s, and 29 frames/s for the image-pretraining mix (it drew the whole
magnified scene for a zoom, then cropped it). The Pillow reference here draws the same way.
"""

import argparse
import math
import os
import platform
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import game  # noqa: E402

ORIGINAL = {"render": 1700, "mix": 29, "step": 2300}   # per second, one CPU core, pygame


def pillow_frame(s, size, zoom=1.0, center=(0.5, 0.5)):
    """One scene drawn with Pillow, as a (3, size, size) float tensor. A zoom draws the whole
    magnified scene and crops the window, as the original did."""
    big = max(size, round(size * zoom))
    image = Image.new("RGB", (big, big), game.PALETTE[game.BACKGROUND])
    draw = ImageDraw.Draw(image)
    disc = lambda x, y, r, colour: draw.ellipse([(x - r) * big, (y - r) * big, (x + r) * big, (y + r) * big], fill=colour)
    for x, y, w, h, th in s.walls:
        c, sn = math.cos(th), math.sin(th)
        corners = [((x + u * c - v * sn) * big, (y + u * sn + v * c) * big) for u, v in ((0, 0), (w, 0), (w, h), (0, h))]
        draw.polygon(corners, fill=game.PALETTE[game.WALL_LAYER])
    for gx, gy in s.gold:
        disc(gx, gy, s.gold_radius, game.PALETTE[game.GOLD_LAYER])
    disc(s.agent_x, s.agent_y, s.agent_radius, game.PALETTE[game.AGENT_LAYER])
    ex = s.agent_x + game.EYE_OFFSET * s.agent_radius * math.cos(s.heading)
    ey = s.agent_y + game.EYE_OFFSET * s.agent_radius * math.sin(s.heading)
    disc(ex, ey, game.EYE_RADIUS * s.agent_radius, game.PALETTE[game.EYE_LAYER])
    if big != size:
        left, top = round((center[0] - 0.5 / zoom) * big), round((center[1] - 0.5 / zoom) * big)
        image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


CLOCK = time.perf_counter


def rate(fn, items, seconds, sync=lambda: None):
    """items per second of fn() (which handles `items` items), timed for at least `seconds` after a warm-up."""
    fn()
    sync()
    calls, start = 0, CLOCK()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = CLOCK() - start
        if elapsed >= seconds:
            return calls * items / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu, then cuda when present)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="CPU thread counts to try (0: torch's default)")
    p.add_argument("--size", type=int, default=224, help="frame size in pixels")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256], help="render batch sizes")
    p.add_argument("--mix", type=int, default=40, help="frames per image-pretraining batch (the original's 40)")
    p.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (fairer per core on a busy machine; CPU only)")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    default_threads = torch.get_num_threads()
    gpu_batches = args.batches + [4096]          # a GPU needs big batches to be busy
    scenes = [game.random_settings(seed) for seed in range(max(args.batches + [256]))]
    if "cuda" in devices:
        scenes = scenes * (max(gpu_batches) // len(scenes) + 1)
    print(f"game benchmark: {args.size} px; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}" + (f"; {torch.cuda.get_device_name()}" if "cuda" in devices else "") +
          f"; {args.clock} clock; load average {os.getloadavg()[0]:.1f}")

    # the Pillow reference, one scene at a time on one core
    torch.set_num_threads(1)
    n_ref = 64
    ref_render = rate(lambda: [pillow_frame(s, args.size) for s in scenes[:n_ref]], n_ref, args.seconds)

    def pillow_mix():   # the same scenes, jitters and zooms as game.pretrain_image_batch(args.mix, args.size, 0)
        mix, zoom, centers = game.pretrain_scenes(args.mix, 0)
        return [pillow_frame(s, args.size, z, c) for s, z, c in zip(mix, zoom, centers)]
    ref_mix = rate(pillow_mix, args.mix, args.seconds)
    check = torch.stack([pillow_frame(s, args.size) for s in scenes[:8]])
    agree = (game.render(scenes[:8], args.size) == check).all(1).double().mean().item()
    print(f"Pillow reference agrees with game.render on {100 * agree:.1f}% of pixels (edges differ by rasterization rules)")

    rows = []
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for threads in (args.threads if device == "cpu" else [default_threads]):
            torch.set_num_threads(threads or default_threads)
            t = torch.get_num_threads() if device == "cpu" else "-"
            for B in (args.batches if device == "cpu" else gpu_batches):
                batch = game.GameBatch(scenes[:B], device)
                frames = rate(lambda: batch.render(args.size), B, args.seconds, sync)
                rows.append(("render", device, t, B, frames, ref_render))
            mix = lambda: game.pretrain_image_batch(args.mix, args.size, 0, device)
            rows.append(("mix (zooms 2..21)", device, t, args.mix, rate(mix, args.mix, args.seconds, sync), ref_mix))
            for B in (1, 256):
                batch = game.GameBatch(scenes[:B], device)
                actions = torch.randint(0, 5, (B,), device=device)
                rows.append(("step", device, t, B, rate(lambda: batch.step(actions), B, args.seconds, sync), None))
    torch.set_num_threads(default_threads)

    print(f"\n{'workload':<18} {'device':<6} {'threads':>7} {'B':>5} {'game.py /s':>11} {'Pillow /s':>10} "
          f"{'ratio':>6} {'original /s':>12} {'vs orig':>8}")
    for name, device, threads, B, ours, ref in rows:
        original = ORIGINAL[name.split()[0]]
        ref_cols = f"{ref:>10,.0f} {ours / ref:>6.1f}" if ref else f"{'':>10} {'':>6}"
        print(f"{name:<18} {device:<6} {threads!s:>7} {B:>5} {ours:>11,.0f} {ref_cols} {original:>12,} {ours / original:>7.1f}x")


if __name__ == "__main__":
    main()
