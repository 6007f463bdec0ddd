#!/usr/bin/env bash
# The whole nanozh pipeline on the bundled corpus, in about 15 minutes on a 2-core CPU (the GPU
# is used when there is one): tokenizer -> shards -> pretrain -> SFT -> DPO -> bits per
# character -> a chat answer.
#
#   bash quickstart.sh           # run every stage; a finished stage is skipped, a killed one resumes
#   bash quickstart.sh --redo    # start over
#
# Every stage is one of the commands the README walks through; read them here in order. Outputs go
# to out/quickstart (OUT=... to change): the tokenizer, the shard directories, one run directory
# per training stage (OUT/<stage>/latest is a model directory), and times/, bpc/ for the summary.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/quickstart}
if [ "${1:-}" = "--redo" ]; then rm -rf "$OUT"; fi
mkdir -p "$OUT/times" "$OUT/bpc"

# a virtual environment with the pinned requirements (torch==2.13.0, CPU build unless you installed another)
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
PY=.venv/bin/python
export PYTHONUNBUFFERED=1

# stage NAME COMMAND...: run COMMAND unless NAME finished before; record its wall time.
stage() {
    local name=$1; shift
    if [ -f "$OUT/times/$name" ]; then
        echo "== $name: done before ($(cat "$OUT/times/$name")s), skipped"; return
    fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$@"
    echo $((SECONDS - t0)) > "$OUT/times/$name"
}

# train NAME SCRIPT FLAGS...: a training stage that continues from its last checkpoint if it was killed.
train() {
    local name=$1 script=$2; shift 2
    local resume=()
    [ -e "$OUT/$name/latest" ] && resume=(--resume)
    stage "$name" $PY "$script" --out_dir "$OUT/$name" "$@" "${resume[@]}"
}

# held-out bits per character of a stage's model (tokenizer-independent, so stages compare fairly)
bpc() {
    [ -f "$OUT/bpc/$1" ] && return
    $PY eval.py --model "$OUT/$1/latest" --text data/corpus/heldout.parquet --stride 256 > "$OUT/bpc/$1.json"
    $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['bpc'])" "$OUT/bpc/$1.json" > "$OUT/bpc/$1"
}

# 1. a small tokenizer for the tiny demo model: at 16k pieces (the shipped tokenizer) the output
#    layer would be most of a 3M-parameter model's compute; 8k halves it.
stage tokenizer $PY tokenizer/train_tokenizer.py --input data/corpus/pretrain --vocab_size 8000 \
    --input_sentence_size 300000 --out "$OUT/tokenizer"

# 2. cleaned, deduplicated token shards (train + validation split) for each stage
for kind in pretrain sft dpo; do
    case $kind in pretrain) input=data/corpus/pretrain ;; sft) input=data/corpus/sft.jsonl.gz ;; dpo) input=data/corpus/dpo.jsonl.gz ;; esac
    stage "data_$kind" $PY data/prepare.py --kind $kind --input $input --tokenizer "$OUT/tokenizer/tokenizer.model" \
        --out "$OUT/data/$kind" --max_len 256
done

# 3. pretraining: the tiny preset, most of the time budget
train pretrain train_pretrain.py --config configs/tiny.json --data "$OUT/data/pretrain" \
    --max_steps 600 --batch_size 16 --lr 3e-3 --min_lr 3e-4 --warmup_steps 30 --eval_every 200 --save_every 100 --log_every 20
bpc pretrain

# 4. supervised fine-tuning on the bundled conversations (loss on assistant tokens only)
train sft train_sft.py --init_from "$OUT/pretrain/latest" --data "$OUT/data/sft" \
    --max_steps 200 --batch_size 16 --eval_every 100 --save_every 100 --log_every 20
bpc sft

# 5. DPO against the frozen SFT model
train dpo train_dpo.py --init_from "$OUT/sft/latest" --data "$OUT/data/dpo" \
    --max_steps 60 --batch_size 8 --eval_every 30 --save_every 30 --log_every 10
bpc dpo

# 6. the summary table, then a chat answer from the final model
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def last(stage: str, key: str):
    path = out / stage / "metrics.jsonl"
    values = [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r] if path.exists() else []
    return f"{values[-1]:.4f}" if values else "-"
print(f"\n{'stage':<14}{'time':>8}{'train loss':>12}{'val loss':>10}{'bpc':>8}")
total = 0
for stage in ["tokenizer", "data_pretrain", "data_sft", "data_dpo", "pretrain", "sft", "dpo"]:
    seconds = int((out / "times" / stage).read_text())
    total += seconds
    bpc_file = out / "bpc" / stage
    bpc = f"{float(bpc_file.read_text()):.3f}" if bpc_file.exists() else "-"
    print(f"{stage:<14}{seconds:>7}s{last(stage, 'loss'):>12}{last(stage, 'val_loss'):>10}{bpc:>8}")
print(f"{'total':<14}{total:>7}s   (bpc: bits per character on data/corpus/heldout.parquet)")
EOF
QUESTION="请介绍一下你自己。"
echo
echo "用户: $QUESTION"
echo -n "nanozh: "
$PY sample.py --model "$OUT/dpo/latest" --prompt "$QUESTION" --temperature 0.7 --top_k 20 --repetition_penalty 1.2 \
    --max_new_tokens 120 --seed 0
