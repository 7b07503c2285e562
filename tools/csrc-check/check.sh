#!/usr/bin/env bash
# Compile-only check of the modelyard CUDA/C++ sources, no GPU needed.
#
#   check.sh [SRC_DIR]          SRC_DIR defaults to this repository's csrc/
#
# Every .cu is compiled with nvcc -c (host code + device code for the target arch, so cicc and
# ptxas run), every .cpp with the C++ compiler cpp_extension uses, both with the exact flags
# torch.utils.cpp_extension.load() would use for the project's build (see flags.py), into a temp
# dir. Nothing is linked. One line per file: OK / FAIL (+ first error lines). Exit 1 if any FAIL.
#
# Environment knobs:
#   JOBS=2          parallel compiles
#   ARCH=90         target as kernels.py builds for an H100 (compute_90,sm_90). ARCH=90a / 100a /
#                   ... retargets the -gencode (kernels.py itself never emits the 'a' variants).
#   KERNELS_PY=...  where to read the project's flags (default: SRC_DIR/../modelyard/engine/kernels.py)
#   CUDA_HOME=/usr/local/cuda   PYTHON=python (one with torch installed: its headers are used)
#   MAX_ERR=8       error lines shown per failing file
#   KEEP=1          keep the temp dir (objects + full logs) even when everything passes
#   VERBOSE=1       print the full compile commands
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---- worker mode: compile one file (called through xargs) ----
if [[ "${1:-}" == "--one" ]]; then
  f="$2"
  # shellcheck disable=SC1091
  source "$CC_TMP/flags.sh"
  base="$(basename "$f")"
  log="$CC_TMP/logs/$base.log"
  t0=$EPOCHREALTIME
  case "$f" in
    *.cu) cmd=("$NVCC" "${NVCC_ARGS[@]}" -isystem "$HERE/shim-include" -c "$f" -o "$CC_TMP/obj/$base.cuda.o") ;;
    *) cmd=("$CXX" "${CXX_ARGS[@]}" -isystem "$HERE/shim-include" -c "$f" -o "$CC_TMP/obj/$base.o") ;;
  esac
  "${cmd[@]}" >"$log" 2>&1
  rc=$?
  dt=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
  {
    flock 9
    if [[ $rc -eq 0 ]]; then
      nw=$(grep -ci 'warning' "$log")
      printf 'OK    %-32s %6ss%s\n' "$base" "$dt" "$([[ $nw -gt 0 ]] && echo "  ($nw warning lines, see log)")"
    else
      printf 'FAIL  %-32s %6ss  (exit %d)\n' "$base" "$dt" "$rc"
      if grep -qiE 'error|fatal' "$log"; then
        grep -iE 'error|fatal' "$log" | grep -v 'errors\? detected in the compilation' | head -n "${MAX_ERR:-8}" | sed 's/^/      /'
        grep -E 'errors? detected in the compilation' "$log" | head -n1 | sed 's/^/      /'
      else
        tail -n "${MAX_ERR:-8}" "$log" | sed 's/^/      /'
      fi
      echo "      full log: $log"
    fi
    [[ -n "${VERBOSE:-}" ]] && printf '      $ %s\n' "${cmd[*]}"
  } 9>>"$CC_TMP/print.lock"
  echo "$rc" >"$CC_TMP/rc/$base"
  exit 0
fi

# ---- driver ----
SRC_DIR="$(cd "${1:-$HERE/../../csrc}" 2>/dev/null && pwd)" || { echo "no such dir: ${1:-}" >&2; exit 2; }
JOBS="${JOBS:-2}"
ARCH="${ARCH:-90}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PYTHON="${PYTHON:-python}"
KERNELS_PY="${KERNELS_PY:-$SRC_DIR/../modelyard/engine/kernels.py}"

[[ -x "$CUDA_HOME/bin/nvcc" ]] || { echo "nvcc not found under CUDA_HOME=$CUDA_HOME" >&2; exit 2; }
# nvcc finds ptxas/cicc/fatbinary via its own nvcc.profile; PATH only matters for tools it shells out to
export PATH="$CUDA_HOME/bin:$PATH"

CC_TMP="$(mktemp -d "${TMPDIR:-/tmp}/cuda-check.XXXXXX")"
export CC_TMP MAX_ERR="${MAX_ERR:-8}" VERBOSE="${VERBOSE:-}"
mkdir -p "$CC_TMP/obj" "$CC_TMP/logs" "$CC_TMP/rc"

if ! "$PYTHON" "$HERE/flags.py" "$SRC_DIR" "$KERNELS_PY" "$ARCH" "$CUDA_HOME" >"$CC_TMP/flags.sh" 2>"$CC_TMP/flags.err"; then
  echo "could not compute build flags:" >&2; cat "$CC_TMP/flags.err" >&2; exit 2
fi
# shellcheck disable=SC1091
source "$CC_TMP/flags.sh"

mapfile -t FILES < <(find "$SRC_DIR" -maxdepth 1 -type f \( -name '*.cu' -o -name '*.cpp' \) | sort)
[[ ${#FILES[@]} -gt 0 ]] || { echo "no .cu/.cpp files in $SRC_DIR" >&2; exit 2; }

gencode=$(printf '%s\n' "${NVCC_ARGS[@]}" | grep -m1 -- '-gencode' || true)
echo "cuda-check: ${#FILES[@]} files in $SRC_DIR, $JOBS jobs, $($NVCC --version | grep -o 'release [0-9.]*'), ${gencode:-no -gencode}"
echo "            $FLAGS_NOTE; temp dir $CC_TMP"

T0=$(date +%s)
# Largest files first so the slow paged_attention units don't end up last on one core.
printf '%s\0' "${FILES[@]}" | xargs -0 ls -S -- | tr '\n' '\0' |
  xargs -0 -n1 -P "$JOBS" bash "$HERE/check.sh" --one
T1=$(date +%s)

fail=0; ok=0
for f in "${FILES[@]}"; do
  b="$(basename "$f")"
  if [[ "$(cat "$CC_TMP/rc/$b" 2>/dev/null)" == "0" ]]; then ok=$((ok + 1)); else fail=$((fail + 1)); fi
done
echo "cuda-check: $ok OK, $fail FAIL in $((T1 - T0))s"
if [[ $fail -gt 0 ]]; then
  echo "            logs kept in $CC_TMP/logs"
  exit 1
fi
[[ -n "${KEEP:-}" ]] && echo "            kept $CC_TMP" || rm -rf "$CC_TMP"
exit 0
