# Inductor's on-disk cache carried from one device call to the next (source it; bash).
#
# A device machine starts bare, so every call compiled every region again (35-45 s per captured variant of
# nl24). With CACHE_CARRY=1:
#   restore_inductor_cache   unpacks .carry/inductor.tgz (if carried) into $TORCHINDUCTOR_CACHE_DIR
#   pack_inductor_cache      packs that folder into $OUT/inductor.tgz.part-aa, -ab, ... (15 MiB each: the device
#                            returns files of at most 16 MiB) unless the archive exceeds CACHE_MAX_MB [45]
#                            (what travels to the device is limited to 64 MiB in all)
# Back here:  cat inductor.tgz.part-* > .carry/inductor.tgz, and carry [".carry"] in the next call.
# Hits depend on the same torch, GPU and generated code; a miss only costs the compile it would have cost.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"

restore_inductor_cache() {
    [ "${CACHE_CARRY:-0}" = 1 ] && [ -f .carry/inductor.tgz ] || return 0
    mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
    tar xzf .carry/inductor.tgz -C "$TORCHINDUCTOR_CACHE_DIR" \
        && echo "inductor cache restored: $(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1)"
}

pack_inductor_cache() {
    [ "${CACHE_CARRY:-0}" = 1 ] && [ -d "$TORCHINDUCTOR_CACHE_DIR" ] || return 0
    local archive=/tmp/inductor_cache.tgz
    tar czf "$archive" -C "$TORCHINDUCTOR_CACHE_DIR" . || return 0
    local mb=$(( $(stat -c %s "$archive") / 1048576 ))
    if [ "$mb" -gt "${CACHE_MAX_MB:-45}" ]; then
        echo "inductor cache not packed: ${mb} MiB > CACHE_MAX_MB ${CACHE_MAX_MB:-45}"; return 0
    fi
    rm -f "$OUT"/inductor.tgz.part-*
    split -b 15M "$archive" "$OUT/inductor.tgz.part-" && echo "inductor cache packed: ${mb} MiB in $(ls "$OUT"/inductor.tgz.part-* | wc -l) part(s)"
}
