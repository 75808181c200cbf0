# frlm: every recipe forwards its arguments, e.g. `just pack --seq-len 128`.
# Run through uv so no system `just` is needed: `python3 -m uv run just RECIPE ...`.
set positional-arguments

# the project's environment: the one `uv run` activated, else ./.venv
python := env_var_or_default("VIRTUAL_ENV", justfile_directory() / ".venv") / "bin/python"

# list the recipes
default:
    @just --list

# fetch frwiki shards from Kaggle (version 1) into data/raw/: _0 alone, --files 0-3,7 or --all; --source hf, --from PATH
download *args:
    {{python}} -m pipeline download "$@"

# write the paragraphs of every downloaded shard to data/paragraphs/part-NNNNN.parquet, exact duplicates removed
extract-paragraphs *args:
    {{python}} -m pipeline extract-paragraphs "$@"

# add a corpus through Hugging Face `datasets` as data/corpora/NAME/: just add-corpus NAME --hf DATASET (or --files, --from-disk)
add-corpus *args:
    {{python}} -m pipeline add-corpus "$@"

# a report on the paragraphs with polars (sizes per source and part, lengths, duplicates, boilerplate) -> data/stats/
stats *args:
    {{python}} -m pipeline stats "$@"

# train (or load) a SuperBPE tokenizer and encode the paragraphs into data/tokens/ (--mix frwiki=0.7,NAME=0.3: added corpora)
tokenize *args:
    {{python}} -m pipeline tokenize "$@"

# pack the token stream into fixed-length rows: just pack --seq-len 128,2048
pack *args:
    {{python}} -m pipeline pack "$@"

# train a model on the packed data (FP8 with Transformer Engine on a GPU)
train *args:
    {{python}} -m train "$@"

# generate text from a checkpoint
sample *args:
    {{python}} -m train.sample "$@"

# a checkpoint as a Hugging Face Llama folder with its tokenizer and model card: just export --run NAME
export *args:
    {{python}} -m train.export "$@"

# bits per byte on any text (--text, --parquet), or lm-evaluation-harness tasks (--tasks)
eval *args:
    {{python}} -m train.evaluation "$@"

# the whole pipeline on an embedded corpus: no download, no GPU, separate demo/ folder
demo *args:
    {{python}} -m benchmarks.demo "$@"

# write a synthetic frwiki-format JSONL (the demo's corpus and the benchmarks' input)
make-corpus *args:
    {{python}} -m benchmarks.synthetic_corpus "$@"

# extraction throughput vs bare orjson (every bench-* prints its table; --write-docs also updates docs/benchmarks.md)
bench-extract *args:
    {{python}} -m benchmarks.bench_extract "$@"

# tokenizer training and encoding throughput, SuperBPE vs BPE compression
bench-tokenize *args:
    {{python}} -m benchmarks.bench_tokenize "$@"

# packing throughput on a synthetic 100M-token stream
bench-pack *args:
    {{python}} -m benchmarks.bench_pack "$@"

# packed-data loader throughput
bench-loader *args:
    {{python}} -m benchmarks.bench_loader "$@"

# run the test suite
test *args:
    {{python}} -m pytest "$@"

# precision modes side by side on the GPU (tokens/s, MFU, memory, loss, bpb)
bench-train *args:
    {{python}} -m benchmarks.bench_train "$@"

# where one training step's GPU memory goes (weights, optimizer, logits, saved activations, backward), on a GPU
bench-memory *args:
    {{python}} -m benchmarks.bench_memory "$@"

# 1 vs 2 GPUs under torchrun: scaling efficiency, loss match, cross-GPU-count resume, rank death
bench-scaling *args:
    {{python}} -m benchmarks.bench_scaling "$@"

# each projection of a preset, torch BF16 vs TE FP8 at the model's shapes: the per-projection FP8 policy
bench-linear *args:
    {{python}} -m benchmarks.bench_linear "$@"

# generation speed: new tokens/s at batch 1 and 64, CPU and GPU (eager and as a CUDA graph)
bench-sample *args:
    {{python}} -m benchmarks.bench_sample "$@"

# is this machine ready to train? GPU, compute capability, torch/CUDA/cuDNN, Transformer Engine, a real FP8 GEMM
doctor *args:
    {{python}} -m train.doctor "$@"
