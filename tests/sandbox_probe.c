/* Escape attempts from inside a run-script (tests/test_sandbox.py builds this with gcc -static).
 * Each command prints one line "RESULT <name> <outcome>" where outcome is "ok" or the errno name. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
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

static int unix_socket(const char *path, struct sockaddr_un *addr) {
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    strncpy(addr->sun_path, path, sizeof addr->sun_path - 1);
    return socket(AF_UNIX, SOCK_STREAM, 0);
}

/* In a container: hand a descriptor of this /proc to whoever listens on `path` (SCM_RIGHTS). */
static int send_proc(const char *path) {
    struct sockaddr_un addr;
    int proc = open("/proc", O_PATH | O_DIRECTORY);
    int sock = unix_socket(path, &addr);
    int rc = -1;
    for (int i = 0; i < 100 && (rc = connect(sock, (struct sockaddr *)&addr, sizeof addr)) < 0; i++) usleep(100000);
    if (rc < 0) return report("send-proc", -1);
    char byte = 'p', control[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &proc, sizeof proc);
    return report("send-proc", (int)sendmsg(sock, &msg, 0));
}

/* In the script: take a /proc descriptor from `path`, then write `value` to the sysctl `name` through it. */
static int recv_sysctl(const char *path, const char *name, const char *value) {
    struct sockaddr_un addr;
    int sock = unix_socket(path, &addr);
    unlink(path);
    if (bind(sock, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(sock, 1) < 0) return report("recv-listen", -1);
    report("recv-listen", 0);
    int conn = accept(sock, NULL, NULL);
    if (conn < 0) return report("recv-proc", -1);
    char byte, control[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    if (recvmsg(conn, &msg, 0) < 0 || !CMSG_FIRSTHDR(&msg)) return report("recv-proc", -1);
    int proc;
    memcpy(&proc, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof proc);
    report("recv-proc", 0);
    int fd = openat(proc, name, O_WRONLY);
    if (fd < 0) return report("proc-fd-sysctl-write", -1);
    return report("proc-fd-sysctl-write", (int)write(fd, value, strlen(value)));
}

/* A cgroup namespace of the script's own, and cgroup file systems mounted from it: does the host's
 * cgroup `victim` (made beside the build's own cgroup) show, and can it be killed through cgroup.kill? */
static int cgroupns(const char *victim) {
    report("unshare-cgroupns", unshare(CLONE_NEWCGROUP));
    const char *trees[][3] = {
        {"/mnt/disks/cg2", "cgroup2", ""},
        {"/mnt/disks/cgsd", "cgroup", "none,name=systemd"},
        {"/mnt/disks/cgmem", "cgroup", "memory"},
    };
    for (int i = 0; i < 3; i++) {
        char name[128], path[512];
        mkdir(trees[i][0], 0755);
        snprintf(name, sizeof name, "mount-%s-%s", trees[i][1], *trees[i][2] ? trees[i][2] : "v2");
        report(name, mount(trees[i][1], trees[i][0], trees[i][1], 0, trees[i][2]));
        snprintf(path, sizeof path, "%s/%s", trees[i][0], victim);
        struct stat st;
        snprintf(name, sizeof name, "sees-victim-%d", i);
        report(name, stat(path, &st));
    }
    char kill_path[512];
    snprintf(kill_path, sizeof kill_path, "/mnt/disks/cg2/%s/cgroup.kill", victim);
    int k = open(kill_path, O_WRONLY);
    report("cgroup-kill", k < 0 ? -1 : (int)write(k, "1", 1));
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *what = argv[1];
    if (!strcmp(what, "chroot-escape")) return chroot_escape(argv[2]);
    if (!strcmp(what, "send-proc")) return send_proc(argv[2]);
    if (!strcmp(what, "recv-sysctl")) return recv_sysctl(argv[2], argv[3], argv[4]);
    if (!strcmp(what, "cgroupns")) return cgroupns(argv[2]);
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
