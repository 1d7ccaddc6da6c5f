/* Escape attempts from inside a run-script (tests/test_sandbox.py builds this with gcc -static).
 * Each command prints one line "RESULT <name> <outcome>" where outcome is "ok" or the errno name. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static int report(const char *name, int rc) {
    printf("RESULT %s %s\n", name, rc < 0 ? strerrorname_np(errno) : "ok");
    fflush(stdout);
    return 0;
}

/* The classic escape: chroot into a subdirectory while keeping the cwd outside it, climb, chroot ".". */
static int chroot_escape(const char *marker) {
    mkdir("/mnt/disks/jail", 0755);
    if (chroot("/mnt/disks/jail") < 0) return report("chroot", -1);
    for (int i = 0; i < 64; i++) chdir("..");
    chroot(".");
    int fd = open(marker, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) { write(fd, "escaped\n", 8); close(fd); }
    return report("chroot-escape-write", fd);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *what = argv[1];
    if (!strcmp(what, "chroot-escape")) return chroot_escape(argv[2]);
    if (!strcmp(what, "open")) {  /* open each named device read-write */
        for (int i = 2; i < argc; i++) {
            char name[256];
            snprintf(name, sizeof name, "open:%s", argv[i]);
            int fd = open(argv[i], O_RDWR);
            report(name, fd);
            if (fd >= 0) close(fd);
        }
        return 0;
    }
    if (!strcmp(what, "mknod")) {  /* a block node of the first loop device, here and in /dev */
        report("mknod-blk-tmp", mknod("/mnt/disks/blk", S_IFBLK | 0600, makedev(7, 0)));
        report("mknod-blk-dev", mknod("/dev/probe-blk", S_IFBLK | 0600, makedev(7, 0)));
        report("mknod-chr-dev", mknod("/dev/probe-mem", S_IFCHR | 0600, makedev(1, 1)));
        return 0;
    }
    if (!strcmp(what, "modules")) {
        int fd = open("/dev/null", O_RDONLY);
        report("finit_module", (int)syscall(SYS_finit_module, fd, "", 0));
        report("init_module", (int)syscall(SYS_init_module, "", (unsigned long)0, ""));
        return 0;
    }
    if (!strcmp(what, "mounts")) {  /* file systems that would reach the host's devices or cgroups */
        mkdir("/mnt/disks/m", 0755);
        report("mount-devtmpfs", mount("devtmpfs", "/mnt/disks/m", "devtmpfs", 0, ""));
        report("mount-cgroup2", mount("cgroup2", "/mnt/disks/m", "cgroup2", 0, ""));
        report("mount-cgroup-freezer", mount("cgroup", "/mnt/disks/m", "cgroup", 0, "freezer"));
        report("mount-sysfs-rw", mount("sysfs", "/mnt/disks/m", "sysfs", 0, ""));
        report("remount-sys-rw", mount(NULL, "/sys", NULL, MS_REMOUNT | MS_BIND, ""));
        report("umount-proc-sys", umount2("/proc/sys", MNT_DETACH));
        report("remount-usr-rw", mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, ""));
        report("mount-tmpfs", mount("tmpfs", "/mnt/disks/m", "tmpfs", 0, "size=1m"));
        return 0;
    }
    return 2;
}
