"""The cleanup list of 03-cos-disk.md, on a fake root."""

from __future__ import annotations

from pathlib import Path

from cos_customizer.provisioner.cleanup import clean


def make(root: Path, *paths: str) -> None:
    for relative in paths:
        path = root / relative
        if relative.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("content")


def test_clean(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    make(outside, "keep-me")
    make(
        root,
        "var/lib/.cos-customizer/user/run.sh",
        "mnt/stateful_partition/etc/x",
        "etc/docker/key.json",
        "etc/docker/daemon.json",
        "var/lib/systemd/random-seed",
        "var/lib/systemd/deb-systemd-helper-enabled/a",
        "var/lib/systemd/timers/t",
        "var/cache/apt/pkgcache.bin",
        "var/cache/debconf/config.dat",
        "var/cache/other/junk",
        "var/tmp/scratch",
        "var/lib/crash_reporter/r",
        "var/lib/metrics/m",
        "var/lib/update_engine/prefs/p",
        "var/lib/whitelist/w",
        "var/lib/cloud/instance/i",
        "var/log/journal/abc/system.journal",
        "var/log/audit/audit.log",
        "var/log/app/app.log",
        "var/log/messages",
        "etc/netplan/50.yaml",
        "tmp/t",
        "etc/ssh/ssh_host_rsa_key",
        "etc/ssh/ssh_host_rsa_key.pub",
        "etc/ssh/sshd_config",
        "var/lib/docker/image/keep",
        "home/chronos/keep",
    )
    (root / "var/log/link").symlink_to(outside / "keep-me")
    done = clean(root)
    gone = [
        "var/lib/.cos-customizer",
        "mnt/stateful_partition/etc",
        "etc/docker/key.json",
        "var/lib/systemd/random-seed",
        "var/lib/systemd/timers",
        "var/cache/other",
        "var/tmp/scratch",
        "var/lib/crash_reporter/r",
        "var/lib/metrics/m",
        "var/lib/update_engine/prefs",
        "var/lib/whitelist/w",
        "var/lib/cloud/instance",
        "var/log/journal/abc",
        "var/log/audit/audit.log",
        "etc/netplan/50.yaml",
        "tmp/t",
        "etc/ssh/ssh_host_rsa_key",
        "etc/ssh/ssh_host_rsa_key.pub",
    ]
    for relative in gone:
        assert not (root / relative).exists(), relative
    kept_dirs = ["var/cache", "var/lib/systemd", "var/tmp", "var/lib/cloud", "var/log/journal", "etc/netplan", "tmp"]
    for relative in kept_dirs:
        assert (root / relative).is_dir(), relative
    for relative in (
        "var/cache/apt/pkgcache.bin",
        "var/cache/debconf/config.dat",
        "var/lib/systemd/deb-systemd-helper-enabled/a",
        "etc/docker/daemon.json",
        "etc/ssh/sshd_config",
        "var/lib/docker/image/keep",
        "home/chronos/keep",
    ):
        assert (root / relative).read_text() == "content", relative
    assert (root / "var/log/app/app.log").read_text() == ""
    assert (root / "var/log/messages").read_text() == ""
    assert (outside / "keep-me").read_text() == "content"  # a symlink under /var/log is not followed out
    assert "removed /var/lib/.cos-customizer" in done
    assert clean(root) == []  # idempotent


def test_clean_on_an_empty_root(tmp_path: Path) -> None:
    assert clean(tmp_path) == []


def test_symlinked_directories_are_not_followed_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    make(outside, "a/secret")
    (root / "var").mkdir(parents=True)
    (root / "var/tmp").symlink_to(outside / "a")
    (root / "var/lib").symlink_to(outside)
    clean(root)
    assert (outside / "a/secret").read_text() == "content"
