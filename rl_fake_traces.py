"""rl_fake_traces.py: stage 5 of the curriculum, imitation of the oracle's traces.

The brain acts through its text side: at each step it sees the current frame (img_enc) and the actions
taken so far as text (<s> <left> <left> <forward> ...), and text_dec names the next action token. Here it
learns from the game's oracle on bare scenes: traces whose actions were really executed (each step's frame
is re-rendered from the stored state), each action scored causally from the logits of the position before
it, with that step's frame as context. The original scored each action at a position that could already see
it, so its imitation loss went to ~0 while the agent learned nothing.

    python rl_fake_traces.py --init-from runs/image/pretrain_image_best.pt runs/text/pretrain_text_best.pt
    nohup python rl_fake_traces.py --preset base --gpu 0 --init-from ... &
"""
import functools
import math

import numpy as np
import torch

import core
import game


def draw_batch(rng, n, max_agent_offset, facing_share, facing_error, n_self, backward, seq_len):
    """One batch's n bare scenes (the gold up to max_agent_offset from the agent, a share facing_share of them with
    the agent facing the gold within facing_error degrees), and the oracle's traces of all but the first n_self,
    played on the CPU: (scenes, Rollout or None). Made ahead in --workers processes; the brain plays the first
    n_self itself in the training process."""
    offsets = rng.uniform(game.MIN_BARE_OFFSET, max_agent_offset, n)
    facing = (rng.random(n) < facing_share if facing_share else np.zeros(n, dtype=bool))  # share 0: no draw
    scenes = [game.random_bare_settings(rng, max_agent_offset=o, max_heading_error=math.radians(facing_error) if f else None)
              for o, f in zip(offsets, facing)]
    oracle = (core.rollout(scenes[n_self:], "oracle", 0, "cpu", game.MAX_ACTIONS, seq_len, backward=backward)
              if n_self < n else None)
    return scenes, oracle


def main(argv=None):
    parser = core.stage_parser(__doc__, steps=1500, batch_size=16, lr=5e-4, warmup=50, eval_every=250,
                               save_every=250)
    parser.add_argument("--max-agent-offset", type=float, default=0.3,
                        help="gold within this box half-width around the agent; training draws offsets up to it "
                             "(from game.MIN_BARE_OFFSET)")
    parser.add_argument("--oracle-backward", action="store_true", help="imitate the oracle that may also reverse")
    parser.add_argument("--dagger", type=core.in_range(0, 1), default=0.5,
                        help="share of each batch's scenes played by the brain itself and labelled by the oracle")
    parser.add_argument("--explore", type=core.in_range(0, 1), default=0.5,
                        help="in the brain's own episodes, the share of random moves (so the trace so far does not "
                             "tell the next action, and the frame must)")
    parser.add_argument("--dagger-actions", type=core.at_least(1), default=16,
                        help="the brain's own episodes stop after this many actions (later states teach less)")
    parser.add_argument("--actions-per-batch", type=core.at_least(0), default=128,
                        help="actions scored per batch, drawn from the batch's episodes (0: all; each costs a frame "
                             "through img_enc, and consecutive actions of one episode teach much the same)")
    parser.add_argument("--facing-share", type=core.in_range(0, 1), default=0.0,
                        help="share of the scenes whose agent starts facing the gold within --facing-error: the "
                             "decisions near alignment (walk, or turn once more) are few in traces from uniform "
                             "headings (about a tenth of the oracle's states are within 20 degrees)")
    parser.add_argument("--facing-error", type=core.in_range(0, 180), default=45.0, help="degrees; see --facing-share")
    core.add_forgetting_args(parser, qa_replay=True)
    core.add_workers_arg(parser)
    parser.add_argument("--eval-scenes", type=core.at_least(1), default=64,
                        help="held-out scenes per offset in each evaluation")
    parser.add_argument("--eval-offsets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5],
                        help="max_agent_offset of the held-out scenes")
    args = parser.parse_args(argv)
    if min(args.max_agent_offset, *args.eval_offsets) < game.MIN_BARE_OFFSET:
        parser.error(f"--max-agent-offset and --eval-offsets must be at least {game.MIN_BARE_OFFSET} (closer, the "
                     f"gold has hardly room beside the agent), got {args.max_agent_offset} and {args.eval_offsets}")

    run = core.Run("rl_fake_traces", args, trains=core.AGENT_PARTS, mode="max")
    brain = run.build(run.tokenizer)
    size, seq_len = run.cfg.img_size, run.cfg.seq_len
    if seq_len < game.MAX_ACTIONS + 1:
        raise core.UsageError(f"seq_len {seq_len} cannot hold <s> and {game.MAX_ACTIONS} actions")
    replay, probe, qa, line = core.keeping_setup(run, brain, args)
    n_self = round(args.dagger * args.batch_size)
    data = run.prefetch_scenes(functools.partial(draw_batch, n=args.batch_size, max_agent_offset=args.max_agent_offset,
                                                 facing_share=args.facing_share, facing_error=args.facing_error,
                                                 n_self=n_self, backward=args.oracle_backward, seq_len=seq_len),
                               core.keeping_counts(brain, args, replay, qa, line))

    for batch in run.batches():
        rng = run.rng()
        with run.timing("data"):
            (scenes, oracle), kept_scenes = data.get(batch)
            # oracle traces, and (DAgger) the brain's own episodes with the oracle's action for every state it
            # met: imitating oracle traces alone lets the brain copy its previous action instead of looking
            traces = [oracle.to(run.device)] if oracle else []
            if n_self:
                traces.append(core.rollout(scenes[:n_self], "sample", size, run.device, args.dagger_actions, seq_len,
                                           brain=brain, generator=run.torch_generator(), backward=args.oracle_backward,
                                           explore=args.explore))
            states, text, step, targets = [], [], [], []
            for trace in traces:
                s, e, t = trace.flat()
                states, text, step, targets = (states + s, text + [trace.text[e]], step + [t],
                                               targets + [trace.labels[e, t]])
            text, step, targets = torch.cat(text), torch.cat(step), torch.cat(targets)
            if 0 < args.actions_per_batch < len(step):
                keep = np.sort(rng.choice(len(step), args.actions_per_batch, replace=False))
                states, (text, step, targets) = [states[i] for i in keep], (x[torch.from_numpy(keep).to(x.device)]
                                                                            for x in (text, step, targets))
        with run.autocast():
            logp, entropy = core.score_actions(brain, states, text, step, size, targets=targets)
            imitation = -logp.float().mean()
            keep, kept = core.keeping_loss(brain, args, replay, kept_scenes, rng, qa, line)
        loss = imitation + keep
        run.step(loss)
        run.log_step({"loss": loss.item(), "imitation": imitation.item(),
                      **{name: value.item() for name, value in kept.items()},
                      "oracle_action_prob": logp.exp().mean().item(), "entropy": entropy.mean().item(),
                      "actions": len(step)}, samples=len(step))
        if run.due(args.eval_every) or run.final():
            metrics = core.evaluate_agent(brain, size, run.device, args.eval_offsets, args.eval_scenes, split="val")
            metrics.update(core.kept_skills(brain, probe, qa, line))
            run.save(metrics, metric=metrics[f"greedy_success@{args.max_agent_offset}"]
                     if f"greedy_success@{args.max_agent_offset}" in metrics else None)
        elif run.due(args.save_every):
            run.save()
    run.close()


if __name__ == "__main__":
    core.main_guard(main)
