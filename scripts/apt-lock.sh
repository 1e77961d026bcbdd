# Sourced by setup.sh. with_apt_lock CMD...: runs an apt-get or dpkg command; while another package
# manager holds one of their locks (unattended-upgrades does, for minutes, on a fresh cloud VM), says
# who holds it and tries again every few seconds, for up to $APT_LOCK_WAIT seconds (default 600).
# apt-get's own DPkg::Lock::Timeout is not enough: `apt-get update` and dpkg do not honour it.

with_apt_lock() {
    local deadline=$((SECONDS + ${APT_LOCK_WAIT:-600})) said="" out rc holder
    while :; do
        rc=0
        out=$("$@" 2>&1) || rc=$?
        holder=$(grep -m1 -oE 'Could not get lock [^ ]+( It is held by process [0-9]+( \([^)]*\))?)?|lock was locked by another process with pid [0-9]+|is locked by another process' <<<"$out" || true)
        if ((rc != 0)) && [[ -n $holder ]] && ((SECONDS < deadline)); then
            if [[ $holder != "$said" ]]; then
                echo "setup: waiting for another package manager to finish (${holder%.}); up to $((deadline - SECONDS)) s more" >&2
                said=$holder
            fi
            sleep "${APT_LOCK_POLL:-3}"
            continue
        fi
        # Quiet when it worked; everything it said when it did not.
        ((rc == 0)) || printf '%s\n' "$out" >&2
        return "$rc"
    done
}
