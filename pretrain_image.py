"""pretrain_image.py: stage 1 of the curriculum, the image autoencoder on game frames.

The brain's img_enc and img_dec learn to rebuild frames of the game's image-pretraining mix (full scenes,
jittered scenes, zooms at factors 2..~21), rendered on the training device at every step. The text side
is absent: the image decoder attends to the brain's learned "no text" context rather than to random
noise as in the original, so the decoder always sees the same "nothing" and later stages can tell it
apart from a real sentence.

    python pretrain_image.py --preset tiny --steps 3000
    nohup python pretrain_image.py --preset base --gpu 0 --run-dir runs/image &    # then: tail -f runs/image/train.log
"""
import functools
import os

import torch
import torch.nn.functional as F

import core
import game


@torch.no_grad()
def evaluate(brain, frames, png, chunk=64):
    """Held-out MSE and per-object recovery; a PNG of inputs (top) above reconstructions (bottom)."""
    recon = torch.cat([brain.img_autoencoder(frames[i: i + chunk]).float() for i in range(0, len(frames), chunk)])
    metrics = {"mse": F.mse_loss(recon, frames).item()}
    metrics.update({f"recovered_{k}": v for k, v in core.object_recovery(recon, frames).items()})
    core.save_image_grid([frames[:8], recon[:8]], png)
    return metrics


def main(argv=None):
    parser = core.stage_parser(__doc__, steps=3000, batch_size=40, lr=1e-3, eval_every=250, save_every=250)
    parser.add_argument("--eval-frames", type=core.at_least(1), default=256, help="held-out frames in each evaluation")
    parser.add_argument("--object-weight", type=core.in_range(0), default=10.0,
                        help="loss weight of pixels that are not background: the gold and the eye are a few pixels "
                             "of a frame, and a plain MSE learns to blur them away")
    core.add_workers_arg(parser)
    args = parser.parse_args(argv)

    run = core.Run("pretrain_image", args, trains=["img_enc", "img_dec"])
    brain = run.build()
    size = run.cfg.img_size
    heldout = game.pretrain_image_batch(args.eval_frames, size, core.heldout_rng(0, split="val"), run.device)
    png = os.path.join(run.run_dir, "reconstructions.png")
    data = run.prefetch_scenes(functools.partial(game.pretrain_scenes, args.batch_size))   # scenes, zooms, centres

    for batch in run.batches():
        with run.timing("data"):     # scenes drawn ahead on the CPU, frames rendered here on the device
            frames = game.render_pretrain_scenes(data.get(batch)[0], size, run.device)
        with run.autocast():
            recon = brain.img_autoencoder(frames)
        weight = 1 + (args.object_weight - 1) * (frames < 0.99).any(1, keepdim=True)
        loss = (weight * (recon.float() - frames) ** 2).mean() / weight.mean()
        run.step(loss)
        run.log_step({"loss": loss.item()}, samples=args.batch_size)
        if run.due(args.eval_every) or run.final():
            metrics = evaluate(brain, heldout, png)
            run.save(metrics, metric=metrics["mse"])
        elif run.due(args.save_every):
            run.save()
    run.close()


if __name__ == "__main__":
    core.main_guard(main)
