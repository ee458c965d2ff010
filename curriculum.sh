#!/usr/bin/env bash
# curriculum.sh: the whole curriculum in one command. Every stage in order, each starting from the best
# checkpoints of the ones before it (--init-from), then eval.py on the brains they made.
#
#   bash curriculum.sh                                   # tiny brain on the CPU (about 29 minutes on 2 cores)
#   bash curriculum.sh --quick                           # smoke run: tiny shapes, a few steps (under 3 minutes)
#   nohup bash curriculum.sh --long &                    # tiny brain, the long chain behind the README's best agent
#   nohup bash curriculum.sh --preset base --gpu 0 &     # the real run; then: tail -f runs/curriculum/curriculum.log
#
# Options: --quick, --long (the tiny brain with the stage lengths of the README's best CPU agent, no minute
# caps: hours), --dry-run (print each stage's command and stop), --out-dir DIR (default runs/curriculum),
# --jobs N (default 2: stages that do not start from each other, image and text pretraining, run side by
# side; 1: one at a time), --help. Every other flag goes
# to every stage (e.g. --preset base, --gpu 0, --device cuda, --seed 1, --amp bf16, --compile); --gpu and
# --device also go to eval.py. Running it again after a kill or a crash continues: a stage whose folder holds
# finished.json is skipped, an interrupted one resumes from its newest checkpoint (--resume), and the report
# is rewritten.
{ # the whole script is one block, read before it runs: editing this file while a curriculum runs is safe
set -euo pipefail
if [ "${BASH_VERSINFO[0]}" -lt 5 ] || { [ "${BASH_VERSINFO[0]}" -eq 5 ] && [ "${BASH_VERSINFO[1]}" -lt 1 ]; }; then
  echo "error: curriculum.sh needs bash 5.1 or newer (it waits for whichever stage ends first);" \
       "this is $BASH_VERSION" >&2
  exit 2
fi

# ---- per-stage settings: edit here ------------------------------------------------------------------
# What makes a stage what it is, in every mode: the turn phase is the QA tutorial asking "which way should
# you turn to face the gold?" alone, with the other families replayed, at a constant rate, training only the
# brain's keypoint reader, which learns to read the heading (README, "The turn phase").
ALL_turn=(--families turn --freeze img_enc img_dec text_enc text_dec --warmup 10 --min-lr-frac 1.0)
# The QA tutorial trains only the keypoint branch of img_enc (its heat maps and token), not its patch embedding
# and blocks: training those moved the features the line trick's stroke reads, and the QA brain lost the line
# (kept IoU 0.009-0.019 after trick_line.py's 10% control sentences, 0.065-0.149 after 25%), while the agent
# reads the heading from what the QA tutorial teaches the keypoint branch (img_enc frozen whole: the agent
# failed). In three chains of three the final brain kept the line (0.44-0.45), answered better, and walked as
# well or better at offsets 0.1-0.3 (README, "The QA tutorial training only the keypoint branch"). The line trick keeps its own 10% control
# sentences, which read held-back prompts better than the 25% used before (README, "Fewer control sentences").
ALL_qa=(--freeze img_enc.patchify img_enc.blocks img_enc.ln img_enc.tags)

# Flags for each stage, by mode. They come before the pass-through flags, which override them.

# tiny on the CPU (the default): steps that fit 30 minutes in all on a 2-core machine (image and text
# pretraining side by side, one core each), and --time-limit (minutes; a last evaluation follows) as a cap.
# On this project's shared 2-core machine (load 4-5) the caps ended image, text and line pretraining early:
# 470/550, 530/650, 243/300 batches. The line trick and the agent stages leave the image encoder as image
# pretraining and the QA tutorial made it (--freeze): on this CPU a batch costs about 60%, and in the same minutes
# the line trick reached IoU 0.04 instead of 0.007-0.02 and imitation greedy 59% at offset 0.3 instead of 9%
# (README: "Line trick figures", "Seventh session: imitation with the image encoder frozen"). The image decoder
# draws the line with a stroke (--strokes 1, the default), and the line trick runs at lr 2e-3: IoU 0.205 in
# 400 throwaway batches, 0.166 at 1e-3 (README, "Strokes"). The agent stages train img_dec, which only the
# line replay and plain reconstruction reach: with it frozen they cannot replay the line, and the line lost
# two thirds of its IoU in imitation (0.169 -> 0.058; trained: 0.226, greedy the same; README, "Strokes").
# The skill stages draw their scenes in one worker process (--workers 1): the second core is idle once the
# pretraining pair is done, and the line trick ran 1.7x and the QA tutorial 1.6x the samples/s of before (README,
# "Data workers").
# what the tiny mode leaves frozen (--quick too, so that CI runs the same init-from paths)
FROZEN_line=(--freeze img_enc text_enc text_dec)
FROZEN_agent=(--freeze img_enc)
TINY_COMMON=()
TINY_image=(--steps 550 --time-limit 3 --eval-every 275 --save-every 275)
TINY_text=(--steps 650 --time-limit 4 --eval-every 325 --save-every 325)
TINY_line=(--steps 400 --time-limit 3 --workers 1 --lr 2e-3 "${FROZEN_line[@]}" --eval-every 200
           --save-every 200 --eval-scenes 128)
TINY_qa=(--steps 300 --time-limit 6 --workers 1 --batch-size 16 --eval-every 150 --save-every 150 --eval-scenes 50
         --first-phrasings 200)
TINY_turn=(--steps 600 --time-limit 5 --workers 1 --batch-size 32 --first-phrasings 600 --eval-every 300 --save-every 300
           --eval-scenes 50)
TINY_imitation=(--steps 300 --time-limit 7 --workers 1 "${FROZEN_agent[@]}" --eval-every 100 --save-every 100
                --eval-scenes 32 --eval-offsets 0.1 0.3)
TINY_grpo=(--steps 8 --time-limit 2.5 "${FROZEN_agent[@]}" --batch-size 8 --eval-every 4 --save-every 4
           --eval-scenes 32 --eval-offsets 0.1 0.3)

# --long: tiny on the CPU without minute caps, the stage lengths that made the README's best agent (the long chain
# of "The agent", tenth to twelfth sessions): QA tutorial 600 batches of 16, turn phase 600, imitation 1,500 with
# every part training (frozen, imitation levelled off near 60% at offset 0.3), GRPO at the goal's offset 0.3.
LONG_COMMON=()
LONG_image=(--steps 550 --eval-every 275 --save-every 275)
LONG_text=(--steps 650 --eval-every 325 --save-every 325)
LONG_line=(--steps 400 --workers 1 --lr 2e-3 "${FROZEN_line[@]}" --eval-every 200 --save-every 200 --eval-scenes 128)
LONG_qa=(--steps 600 --workers 1 --batch-size 16 --eval-every 300 --save-every 300 --eval-scenes 50)
LONG_turn=(--steps 600 --workers 1 --batch-size 32 --first-phrasings 600 --eval-every 300 --save-every 300 --eval-scenes 50)
LONG_imitation=(--steps 1500 --workers 1 --eval-every 300 --save-every 300 --eval-scenes 64 --eval-offsets 0.1 0.3 0.5)
LONG_grpo=(--steps 12 --batch-size 8 --offset-start 0.3 --offset-max 0.3 --eval-every 6 --save-every 6
           --eval-scenes 64 --eval-offsets 0.1 0.3 0.5)

# --quick: the smallest brain the tests use and a few steps of each stage; eval.py --quick. The tiny
# preset's vocabulary and sequence length, so a question that no longer fits them fails here too, and the
# tiny mode's frozen parts (FROZEN_*), so a stage that would not find a part it needs fails here too.
QUICK_COMMON=(--img-size 32 --patch 8 --width 32 --img-heads 2 --text-heads 2 --value-heads 2 --warmup 2
              --log-every 2)
QUICK_image=(--steps 8 --batch-size 8 --eval-every 8 --save-every 8 --eval-frames 16)
QUICK_text=(--steps 8 --batch-size 16 --eval-every 8 --save-every 8 --samples 1)
QUICK_line=(--steps 4 "${FROZEN_line[@]}" --batch-size 8 --eval-every 4 --save-every 4
            --eval-scenes 8 --eval-frames 8 --replay-sentences 32 --plain-batch 4 --text-batch 8)
QUICK_qa=(--steps 4 --batch-size 4 --family-every 1 --first-phrasings 2 --eval-every 4 --save-every 4 --eval-scenes 2 --eval-frames 8
          --replay-sentences 32 --plain-batch 4 --text-batch 8)
QUICK_turn=(--steps 4 --batch-size 4 --eval-every 4 --save-every 4 --eval-scenes 2 --eval-frames 8
            --replay-sentences 32 --text-batch 8)
QUICK_imitation=(--steps 4 "${FROZEN_agent[@]}" --batch-size 4 --eval-every 4 --save-every 4 --eval-scenes 4
                 --eval-offsets 0.3 --eval-frames 8 --replay-sentences 32 --plain-batch 4 --text-batch 8)
QUICK_grpo=(--steps 2 "${FROZEN_agent[@]}" --batch-size 2 --group-size 2 --eval-every 2 --save-every 2
            --eval-scenes 4 --eval-offsets 0.3 --eval-frames 8 --replay-sentences 32 --plain-batch 4 --text-batch 8)

# Any other preset (--preset small / base): the stages' own defaults, which are budgets for a GPU.
FULL_COMMON=()
FULL_image=()
FULL_text=()
FULL_line=()
FULL_qa=()
FULL_turn=()
FULL_imitation=()
FULL_grpo=()

# The stages: folder name, script, and the folders (under --out-dir) whose best checkpoints it starts from.
# init-from takes each part from the last of them that trained it: the line trick trains no text part (and in
# the tiny mode only img_dec), so the image and text pretraining are named before it for the QA tutorial
# (the text pretraining after it too, where it does no harm).
STAGES=(
  "image     pretrain_image.py"
  "text      pretrain_text.py"
  "line      trick_line.py      image text"
  "qa        tutorial_qa.py     image text line"
  "turn      tutorial_qa.py     text qa"
  "imitation rl_fake_traces.py  text qa turn"
  "grpo      rl_grpo.py         text qa turn imitation"
)
# eval.py compares these brains, one column each: the stages' best, so the table shows each skill appear
# and what later stages made the brain forget (turn against grpo: what RL cost). The last is the final brain.
# (The imitation brain is left out to save time; its curves are in the final brain's curves picture.)
EVAL=(image text line qa turn grpo)
# -----------------------------------------------------------------------------------------------------

cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
# one torch thread unless you say otherwise: on a shared CPU, torch's threads wait on each other and every
# stage runs several times slower (set OMP_NUM_THREADS=2 on an idle 2-core machine if it is faster there)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MODE=TINY
OUT=runs/curriculum
JOBS=2
DRY=
PASS=()
EVAL_PASS=()
QUICK=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=QUICK; QUICK=(--quick); shift ;;
    --long) MODE=LONG; shift ;;
    --dry-run) DRY=1; shift ;;
    --out-dir) OUT=${2:?--out-dir needs a folder}; shift 2 ;;
    --out-dir=*) OUT=${1#*=}; shift ;;
    --jobs) JOBS=${2:?--jobs needs a number}; shift 2 ;;
    --jobs=*) JOBS=${1#*=}; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;   # the header
    --preset) PASS+=("$1" "${2:?--preset needs a name}"); [ "$2" = tiny ] || PRESET=$2; shift 2 ;;
    --gpu|--device) PASS+=("$1" "${2:?$1 needs a value}"); EVAL_PASS+=("$1" "$2"); shift 2 ;;
    *) PASS+=("$1"); shift ;;
  esac
done

if [ -n "${PRESET:-}" ]; then
  if [ "$MODE" != TINY ]; then
    echo "error: --quick and --long are modes of the tiny brain on the CPU; --preset $PRESET takes the stages' own" \
         "defaults (give their flags yourself to change them)" >&2
    exit 2
  fi
  MODE=FULL
fi
if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --jobs wants a whole number of stages, 1 or more; got '$JOBS'" >&2
  exit 2
fi
setting() { local name="${MODE}_$1[@]"; SETTING=(${!name+"${!name}"}); }

# The command of one stage: its script, its folder, --resume if it has a checkpoint, its flags, --init-from.
stage_command() {
  local key=$1 script=$2 parents=$3 dir="$OUT/$1"
  CMD=("$PYTHON" "$script" --run-dir "$dir")
  if compgen -G "$dir/*.pt" > /dev/null; then CMD+=(--resume); fi
  local all="ALL_$key[@]"; CMD+=(${!all+"${!all}"})
  setting COMMON; CMD+=(${SETTING[@]+"${SETTING[@]}"})
  setting "$key"; CMD+=(${SETTING[@]+"${SETTING[@]}"})
  CMD+=(${PASS[@]+"${PASS[@]}"})
  if [ -n "$parents" ]; then
    CMD+=(--init-from)
    for p in $parents; do CMD+=("$OUT/$p/best"); done
  fi
}

if [ -n "$DRY" ]; then   # what each stage would run now, in order (a stage with checkpoints gets --resume)
  for line in "${STAGES[@]}"; do
    read -r key script parents <<< "$line"
    stage_command "$key" "$script" "${parents:-}"
    echo "$key: ${CMD[*]}"
  done
  exit 0
fi

mkdir -p "$OUT"
LOG="$OUT/curriculum.log"
say() { echo "$(date '+%F %T') curriculum $*" | tee -a "$LOG"; }

# one curriculum per folder at a time; a stage left running by a killed curriculum.sh keeps the lock too
exec 9>>"$OUT/.lock"
if command -v flock >/dev/null && ! flock -n 9; then
  echo "error: another curriculum.sh (or a stage it started) is still running on $OUT" >&2
  exit 1
fi

declare -A PIDS=()   # running stage -> pid
stop() {   # Ctrl-C or kill: the running stages save a checkpoint and stop; run this script again to continue
  say "$1 received: stopping ${PIDS[*]:+the running stages (${!PIDS[*]}) }after their current batch"
  for key in "${!PIDS[@]}"; do kill -TERM "${PIDS[$key]}" 2>/dev/null || true; done
  for key in "${!PIDS[@]}"; do wait "${PIDS[$key]}" 2>/dev/null || true; done
  exit 130
}
trap 'stop SIGINT' INT
trap 'stop SIGTERM' TERM
trap 'stop SIGHUP' HUP

# Starts a command with its output appended to the log (and, on a terminal, shown); its pid is in $!.
# It runs in the background, so that a signal reaches the trap at once, and in its own session, so that
# Ctrl-C reaches this script alone and the stage gets exactly one SIGTERM (a second would stop it unsaved).
# The stages write whole lines, each headed by the time and the stage's name, so side by side they interleave
# line by line.
SETSID=$(command -v setsid || true)
start_logged() {
  if [ -t 1 ]; then
    $SETSID "$@" > >(trap '' INT TERM HUP; exec tee -a "$LOG") 2>&1 &
  else
    $SETSID "$@" >> "$LOG" 2>&1 &
  fi
}

say "start: mode $MODE, folder $OUT, up to $JOBS stages at once, stage flags: ${PASS[*]:-none}" \
    "($(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
START=$SECONDS
# Each stage starts once the stages it starts from have finished, in the order of STAGES, up to --jobs at a
# time: image and text pretraining side by side, the rest one after another.
declare -A DONE=() T0=() SCRIPT=() PARENTS=()
ORDER=()
for line in "${STAGES[@]}"; do
  read -r key script parents <<< "$line"
  ORDER+=("$key"); SCRIPT[$key]=$script; PARENTS[$key]=${parents:-}
  if [ -f "$OUT/$key/finished.json" ]; then
    say "skip $key: $OUT/$key/finished.json says it finished"
    DONE[$key]=1
  fi
done
while :; do
  for key in "${ORDER[@]}"; do
    [ -z "${DONE[$key]:-}" ] && [ -z "${PIDS[$key]:-}" ] && [ ${#PIDS[@]} -lt "$JOBS" ] || continue
    ready=1
    for p in ${PARENTS[$key]}; do [ -n "${DONE[$p]:-}" ] || ready=0; done
    [ $ready = 1 ] || continue
    stage_command "$key" "${SCRIPT[$key]}" "${PARENTS[$key]}"
    say "stage $key: ${CMD[*]}"
    T0[$key]=$SECONDS
    start_logged "${CMD[@]}"
    PIDS[$key]=$!
  done
  [ ${#PIDS[@]} -gt 0 ] || break
  status=0
  wait -n -p ended "${PIDS[@]}" || status=$?
  for key in "${!PIDS[@]}"; do [ "${PIDS[$key]}" = "$ended" ] && break; done
  unset "PIDS[$key]"
  if [ $status -ne 0 ]; then
    say "stage $key failed (see $LOG); fix the cause and run the same command again to continue"
    for other in "${!PIDS[@]}"; do kill -TERM "${PIDS[$other]}" 2>/dev/null || true; done
    for other in "${!PIDS[@]}"; do wait "${PIDS[$other]}" 2>/dev/null || true; done
    exit 1
  fi
  DONE[$key]=1
  say "stage $key finished in $(( (SECONDS - T0[$key]) / 60 )) min $(( (SECONDS - T0[$key]) % 60 )) s"
done
for key in "${ORDER[@]}"; do
  [ -n "${DONE[$key]:-}" ] || { say "stage $key never started: the stages it starts from did not finish"; exit 1; }
done

brains=()
for key in "${EVAL[@]}"; do brains+=("$OUT/$key/best"); done
say "eval: $PYTHON eval.py ${brains[*]} --out $OUT/report ${QUICK[*]:-} ${EVAL_PASS[*]:-}"
start_logged "$PYTHON" eval.py "${brains[@]}" --out "$OUT/report" ${QUICK[@]+"${QUICK[@]}"} \
    ${EVAL_PASS[@]+"${EVAL_PASS[@]}"}
PIDS[eval]=$!
if ! wait "${PIDS[eval]}"; then
  say "eval failed (see $LOG)"
  exit 1
fi
say "done in $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s; report: $OUT/report/report.md"
exit 0
}
