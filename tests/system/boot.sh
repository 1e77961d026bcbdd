#!/bin/sh
# PID 1 of a test machine, before it becomes systemd. Run as
#   setsid unshare --pid --fork --mount --uts --propagation private \
#       sh boot.sh LOWER UPPER WORK ROOT ARCHIVES ARCHIVES_UPPER ARCHIVES_WORK CGROUP
# The tree ROOT is an overlay of the cached root file system LOWER with a throw-away UPPER, so the
# cache is never written. ARCHIVES is one shared .deb cache, or several joined by ":" (overlay's
# lowerdir list, first on top). Everything mounted here lives in this mount namespace and goes with it.
# The network namespace is the host's: a server on the host's 127.0.0.1 is reachable from inside.
set -eu
lower=$1 upper=$2 work=$3 root=$4 archives=$5 archives_upper=$6 archives_work=$7 cgroup=$8

mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
# .debs downloaded by earlier runs are read from the shared cache; this machine's downloads (and
# apt's lock) go to its own layer, so machines running at the same time never share a lock.
mount -t overlay overlay -o "lowerdir=$archives,upperdir=$archives_upper,workdir=$archives_work" \
	"$root/var/cache/apt/archives"
cp /etc/resolv.conf "$root/etc/resolv.conf"
hostname "$(cat "$root/etc/hostname")"
# Units that need hardware, a console or kernel modules a container does not have, or that would
# change the system behind a test's back.
for unit in getty.target console-getty.service systemd-modules-load.service \
	systemd-networkd-wait-online.service systemd-timesyncd.service systemd-firstboot.service \
	apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
	ln -sfn /dev/null "$root/etc/systemd/system/$unit"
done

# systemd takes the cgroup it starts in as its root: a cgroup of its own per machine keeps two
# machines (or the host) from sharing unit cgroups such as /system.slice/mesh-agent.service.
for hierarchy in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
	if [ -e "$hierarchy/cgroup.procs" ]; then
		mkdir -p "$hierarchy/$cgroup"
		echo $$ >"$hierarchy/$cgroup/cgroup.procs"
	fi
done

cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec /lib/systemd/systemd --system
