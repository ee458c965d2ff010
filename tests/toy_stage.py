"""A toy stage for the core tests: the smallest loop built on core.Run, on random frames.

It reads like every real stage (arguments, brain, data, loss, step, log/eval/checkpoint) and adds hooks
the tests need: forced non-finite losses, a pause per batch (to be killed), and a dump of the weights."""
import time

import torch
import torch.nn.functional as F

import core


def main(argv=None):
    parser = core.stage_parser(__doc__, steps=6, batch_size=4, warmup=2, log_every=1, eval_every=3, save_every=2)
    parser.add_argument("--nan-at", type=int, nargs="*", default=[], help="batches whose loss is made NaN")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each batch")
    parser.add_argument("--dump", default=None, help="write the final weights here (rank appended)")
    parser.add_argument("--read", action="store_true",
                        help="text_dec also trains, reading the frames (so its keypoint reader keeps statistics)")
    args = parser.parse_args(argv)
    run = core.Run("toy", args, trains=["img_enc", "img_dec"] + ["text_enc", "text_dec", "reader"] * args.read)
    brain = run.build()
    for batch in run.batches():
        frames = torch.rand(args.batch_size, 3, run.cfg.img_size, run.cfg.img_size, generator=run.torch_generator())
        loss = F.mse_loss(brain.img_autoencoder(frames), frames)
        if args.read:
            text = torch.full((args.batch_size, 4), core.BOS)
            loss = loss + brain.text_logits(text, brain.image_context(frames)).float().logsumexp(-1).mean()
        if batch in args.nan_at:
            loss = loss * float("nan")
        run.step(loss)
        run.log_step({"loss": loss.item()}, samples=args.batch_size)
        if run.due(args.eval_every):
            run.save({"loss": loss.item()}, metric=loss.item())
        elif run.due(args.save_every):
            run.save()
        time.sleep(args.sleep)
    if args.dump:
        torch.save(brain.state_dict(), f"{args.dump}.{run.rank}")
    run.close()


if __name__ == "__main__":
    core.main_guard(main)
