"""`provisioner`: the command the preload VM runs (also `python -m cos_customizer.provisioner`).

  run --config=FILE      start provisioning with this provisioner config
  resume                 continue after a reboot
  handle-disk-layout     the shutdown-time partition relocation (run by a systemd unit)
  wait-metadata KEY      wait until the instance metadata key KEY exists (e.g. DaisyEnd)

Exit status: 0 done, 3 reboot and run `resume`, 1 failed, 2 usage error.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cos_customizer.errors import CustomizerError
from cos_customizer.provisioner import agent, download
from cos_customizer.provisioner.config import ProvisionerConfig
from cos_customizer.provisioner.target import Target


def metadata_value(key: str) -> str | None:
    """The instance metadata attribute `key`, or None while it is not set."""
    value = download.metadata_get(f"instance/attributes/{key}")
    return None if value is None else value.decode()


def wait_metadata(key: str, timeout: float, interval: float = 2.0) -> int:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        try:
            value = metadata_value(key)
        except OSError:
            value = None
        if value is not None:
            print(f"metadata key {key} is set: {value}")
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"metadata key {key} did not appear within {timeout:.0f} seconds", file=sys.stderr)
            return 1
        time.sleep(interval)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provisioner", description="cos-customizer's guest agent for COS VMs.")
    p.add_argument("--target", type=Path, help="a JSON target description (tests); default: this VM")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start provisioning")
    run.add_argument("--config", type=Path, required=True, help="the provisioner config (JSON)")
    sub.add_parser("resume", help="continue provisioning after a reboot")
    layout = sub.add_parser("handle-disk-layout", help="relocate partitions (at shutdown)")
    layout.add_argument("--plan", type=Path, required=True)
    wait = sub.add_parser("wait-metadata", help="wait for an instance metadata key")
    wait.add_argument("key")
    wait.add_argument("--timeout", type=float, default=0, help="seconds; 0 waits forever")
    return p


def _say_now(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        target = Target.load(args.target)
        if args.command == "run":
            try:
                config = ProvisionerConfig.from_json(json.loads(args.config.read_text()), str(args.config))
            except (OSError, json.JSONDecodeError, CustomizerError) as err:
                agent.fail(target, f"cannot use {args.config}: {err}")
                return 1
            return agent.finish(target, lambda: agent.start(target, config))
        if args.command == "resume":
            return agent.finish(target, lambda: agent.resume_state(target))
        if args.command == "handle-disk-layout":
            # Flushed line by line: at shutdown its output goes through a pipe, and a kill must not lose it.
            agent.handle_disk_layout(args.plan.resolve() if args.target is None else args.plan, _say_now)
            return 0
        return wait_metadata(args.key, args.timeout)
    except CustomizerError as err:
        print(f"provisioner: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
