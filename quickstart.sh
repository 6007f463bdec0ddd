#!/usr/bin/env bash
# The whole nanozh pipeline on the bundled corpus, in about 11 minutes on a 2-core CPU (the GPU
# is used when there is one): tokenizer -> shards -> pretrain -> SFT -> DPO -> bits per
# character -> training curves (OUT/curves.png) and a report of the run (OUT/report.md) -> a chat answer.
#
#   bash quickstart.sh           # run every stage; a finished stage is skipped, a killed one resumes
#   bash quickstart.sh --redo    # start over
#
# Every stage is one of the commands the README walks through; read them here in order. Outputs go
# to out/quickstart (OUT=... to change): the tokenizer, the shard directories, one run directory
# per training stage (OUT/<stage>/latest is a model directory), and times/, bpc/ for the summary.
# One run at a time per OUT (OUT/.lock holds the PID of the run that has it); killing the script,
# even with kill -9, stops its stages too (on Linux), and the next run continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/quickstart}
mkdir -p "$OUT"

# One run per output directory: two would train into the same run directories. The lock is a flock on
# OUT/.lock through this script's fd 9, so it goes away with the script however it ends; the stages
# inherit the fd, so a stage that outlives the script (see GUARD below) still keeps the next run out.
# The file is opened read-write, not truncated: it holds the PID of the run that has the lock.
lock() {  # flock(1) is util-linux; elsewhere (macOS) Python takes the same lock on the same fd
    if command -v flock > /dev/null; then flock -n 9
    else python3 -c 'import fcntl; fcntl.flock(9, fcntl.LOCK_EX | fcntl.LOCK_NB)' 2> /dev/null; fi
}
exec 9<> "$OUT/.lock"
if ! lock; then
    pid=$(cat "$OUT/.lock")
    echo "nanozh: $OUT: in use by another quickstart (PID $pid), or by its stages still stopping" \
        "(let it finish or stop it with kill $pid, then run again; or run this one with OUT=another/dir)" >&2
    exit 1
fi
echo $$ > "$OUT/.lock"
if [ "${1:-}" = "--redo" ]; then find "$OUT" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +; fi
mkdir -p "$OUT/times" "$OUT/bpc"

# kill -9 of this script cannot be trapped, and torchrun is not told when its parent dies: it and its
# workers would train on, writing checkpoints into OUT beside the next run. On Linux each stage
# therefore starts under `setpriv --pdeathsig TERM`: the kernel sends the stage SIGTERM when this
# script dies, however it dies; torchrun passes it on to its workers, which save a checkpoint and exit
# (and the workers get SIGTERM if torchrun itself dies: trainer._stop_when_torchrun_dies). Where
# setpriv has no --pdeathsig (macOS, util-linux before 2.33) stages run as they are, and the lock
# above keeps the next run out until a leftover stage has ended.
GUARD=""
if setpriv --pdeathsig TERM true 2> /dev/null; then GUARD="setpriv --pdeathsig TERM"; fi

# a virtual environment with the pinned requirements (torch==2.13.0, CPU build unless you installed
# another); pip runs again only when requirements.txt has changed since the last install
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! cmp -s requirements.txt .venv/quickstart-requirements.txt; then
    .venv/bin/pip install -q -r requirements.txt
    cp requirements.txt .venv/quickstart-requirements.txt
fi
PY=.venv/bin/python
export PYTHONUNBUFFERED=1
T0=$SECONDS
# One OpenMP thread per process: on a 2-core VM a second thread makes these tiny models 2-3x slower
# (measured; the threads spin-wait for each other). The second core goes to a second training
# process instead: on CPU the training stages run as two data-parallel ranks under torchrun (gloo),
# 1.35x the tokens/s of one process (measured); on a GPU, one process.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
NPROC=$($PY -c "import os, torch; print(1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1))")
LAUNCH=(.venv/bin/torchrun --standalone --nproc_per_node="$NPROC")

# stage NAME COMMAND...: run COMMAND unless NAME finished before; record its wall time.
stage() {
    local name=$1; shift
    if [ -f "$OUT/times/$name" ]; then
        echo "== $name: done before ($(cat "$OUT/times/$name")s), skipped"; return
    fi
    echo "== $name: $*"
    local t0=$SECONDS
    $GUARD "$@"
    echo $((SECONDS - t0)) > "$OUT/times/$name"
}

# train NAME SCRIPT FLAGS...: a training stage that continues from its last checkpoint if it was killed.
# Any step_* directory means there is one (a kill between a checkpoint's rename and the update of
# `latest` leaves no `latest`), and a run without --resume refuses a directory of checkpoints.
train() {
    local name=$1 script=$2 resume="" ckpt; shift 2
    for ckpt in "$OUT/$name"/step_[0-9]*; do
        if [ -d "$ckpt" ]; then resume=--resume; fi
    done
    stage "$name" "${LAUNCH[@]}" "$script" --out_dir "$OUT/$name" "$@" $resume
}

# held-out bits per character of a stage's model (tokenizer-independent, so stages compare fairly)
bpc() {
    [ -f "$OUT/bpc/$1" ] && return
    $GUARD $PY eval.py --model "$OUT/$1/latest" --text data/corpus/heldout.parquet --stride 256 > "$OUT/bpc/$1.json"
    $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['bpc'])" "$OUT/bpc/$1.json" > "$OUT/bpc/$1"
}

# 1. a small tokenizer for the tiny demo model: at 16k pieces (the shipped tokenizer) the output
#    layer would be most of a 3M-parameter model's compute; 8k halves it.
stage tokenizer $PY -m data.train_tokenizer --input data/corpus/pretrain --vocab_size 8000 \
    --input_sentence_size 300000 --out "$OUT/tokenizer"

# 2. cleaned, deduplicated token shards (train + validation split) for each stage
for kind in pretrain sft dpo; do
    case $kind in pretrain) input=data/corpus/pretrain ;; sft) input=data/corpus/sft.jsonl.gz ;; dpo) input=data/corpus/dpo.jsonl.gz ;; esac
    # 5% of the DPO pairs are held out (1% would be only ~10 pairs, too few to read a reward accuracy from)
    val=0.01; [ $kind = dpo ] && val=0.05
    stage "data_$kind" $PY -m data.prepare --kind $kind --input $input --tokenizer "$OUT/tokenizer/tokenizer.model" \
        --out "$OUT/data/$kind" --max_len 256 --val_fraction $val
done

# 3. pretraining: the tiny preset gets most of the time budget (batch sizes are per rank; 3e-3 beat
#    6e-3 and 1.2e-2 at step 200 in a sweep)
train pretrain train_pretrain.py --config configs/tiny.json --data "$OUT/data/pretrain" \
    --max_steps 800 --batch_size 8 --lr 3e-3 --min_lr 3e-4 --warmup_steps 40 --eval_every 200 --save_every 100 --log_every 50
bpc pretrain

# 4. supervised fine-tuning on the bundled conversations (loss on assistant tokens only)
train sft train_sft.py --init_from "$OUT/pretrain/latest" --data "$OUT/data/sft" \
    --max_steps 250 --batch_size 8 --lr 1.5e-3 --min_lr 1.5e-4 --warmup_steps 10 --eval_every 125 --save_every 125 --log_every 25
bpc sft

# 5. DPO against the frozen SFT model (at 3e-4 the tiny model's validation loss rose; 5e-5 lowers it)
train dpo train_dpo.py --init_from "$OUT/sft/latest" --data "$OUT/data/dpo" \
    --max_steps 100 --batch_size 4 --lr 5e-5 --min_lr 5e-6 --warmup_steps 10 --eval_every 50 --save_every 50 --log_every 10
bpc dpo

# 6. the curves of the three training stages, then the summary table and OUT/report.md (machine,
#    times, losses, bpc, DPO margin and accuracy, curves, greedy answers to fixed prompts: diff two
#    reports to compare two runs or two commits), then a sampled chat answer from the final model
$PY plot.py "$OUT/pretrain" "$OUT/sft" "$OUT/dpo" --out "$OUT/curves.png"
echo
$GUARD $PY report.py "$OUT"
QUESTION="你好，你是谁？"
echo
echo "用户: $QUESTION"
echo -n "nanozh: "
$GUARD $PY sample.py --model "$OUT/dpo/latest" --prompt "$QUESTION" --temperature 0.7 --top_k 20 --repetition_penalty 1.2 \
    --max_new_tokens 120 --seed 0
echo "quickstart: stages took $((SECONDS - T0))s in all (outputs in $OUT; curves in $OUT/curves.png, report in $OUT/report.md)"
