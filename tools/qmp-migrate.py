#!/usr/bin/env python3
"""Drives a livemig migration through both processes' QMP sockets with the
qemu.qmp library, exactly as one drives two QEMUs (issue 16).

    qmp-migrate.py SCENARIO SOURCE_QMP DESTINATION_QMP MIGRATION_URI

SOURCE_QMP and DESTINATION_QMP are unix:PATH or tcp:HOST:PORT; the
MIGRATION_URI is what migrate-incoming and migrate get. Scenarios:

  complete  capabilities (events, auto-converge), parameters, migrate-incoming,
            migrate, events until completed on both sides, query-migrate on
            both, quit both.
  cancel    a low max-bandwidth, migrate, migrate_cancel after the first
            MIGRATION_PASS, events until cancelled, query-migrate and
            query-status on the source, quit both.
  retry     cancel as above, then on the same two processes migrate-incoming
            and migrate again, unlimited, until completed; quit both.
  postcopy  postcopy-ram on, 32 MiB/s, migrate, migrate-start-postcopy after
            the first MIGRATION_PASS, events until completed (through
            postcopy-active); quit both. The destination needs an incoming
            guest (livemig stress --incoming).

Every check that fails raises (exit status 1). On success it prints one JSON
object on stdout: the events each side sent and the last replies, for the
caller's own checks.
"""

import asyncio
import json
import sys

from qemu.qmp import QMPClient

# A safety net so a broken livemig cannot hang the caller; the checks never
# depend on how long anything takes.
EVENT_WAIT = 120


def address(text):
    if text.startswith("unix:"):
        return text[len("unix:"):]
    if text.startswith("tcp:"):
        host, _, port = text[len("tcp:"):].rpartition(":")
        return (host, int(port))
    raise SystemExit(f"not an address: {text}")


def check(condition, message):
    if not condition:
        raise AssertionError(message)


async def migration_events(client, log, until):
    """Collects MIGRATION and MIGRATION_PASS events until a MIGRATION
    status in `until`; returns that status."""
    while True:
        event = await asyncio.wait_for(client.events.get(), EVENT_WAIT)
        name = event["event"]
        if name not in ("MIGRATION", "MIGRATION_PASS"):
            continue
        check("seconds" in event["timestamp"] and "microseconds" in event["timestamp"], f"event without timestamp: {event}")
        log.append({"event": name, "data": event["data"]})
        if name == "MIGRATION" and event["data"]["status"] in until:
            return event["data"]["status"]


async def first_pass(client, log):
    while True:
        event = await asyncio.wait_for(client.events.get(), EVENT_WAIT)
        if event["event"] in ("MIGRATION", "MIGRATION_PASS"):
            log.append({"event": event["event"], "data": event["data"]})
        if event["event"] == "MIGRATION_PASS":
            return
        if event["event"] == "MIGRATION" and event["data"]["status"] in ("completed", "failed", "cancelled"):
            raise AssertionError(f"the migration ended before its first pass: {event}")


async def set_source(src, bandwidth):
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True},
        {"capability": "auto-converge", "state": bandwidth == 0},
    ]})
    await src.execute("migrate-set-parameters", {
        "multifd-channels": 2, "downtime-limit": 300, "max-bandwidth": bandwidth,
        "cpu-throttle-initial": 30, "cpu-throttle-increment": 20,
    })
    caps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
    check(caps["events"] and caps["multifd"], f"capabilities not as set: {caps}")
    check(caps["auto-converge"] == (bandwidth == 0), f"auto-converge not as set: {caps}")
    params = await src.execute("query-migrate-parameters")
    check(params["max-bandwidth"] == bandwidth and params["downtime-limit"] == 300 and params["cpu-throttle-initial"] == 30,
          f"parameters not as set: {params}")
    return caps, params


async def set_destination(dst):
    await dst.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await dst.execute("migrate-set-parameters", {"multifd-channels": 2})


async def migrate(src, dst, uri, out, key):
    src_log, dst_log = [], []
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate", {"uri": uri})
    src_end, dst_end = await asyncio.gather(
        migration_events(src, src_log, ("completed", "failed", "cancelled")),
        migration_events(dst, dst_log, ("completed", "failed", "cancelled")))
    out[key] = {"source-events": src_log, "destination-events": dst_log,
                "source-info": await src.execute("query-migrate"),
                "destination-info": await dst.execute("query-migrate")}
    check(src_end == "completed", f"source ended {src_end}: {out[key]['source-info']}")
    check(dst_end == "completed", f"destination ended {dst_end}: {out[key]['destination-info']}")


async def cancel(src, dst, uri, out):
    src_log, dst_log = [], []
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate", {"uri": uri})
    await first_pass(src, src_log)
    during = await src.execute("query-migrate")
    check(during["status"] == "active", f"not active after the first pass: {during}")
    check(during["ram"]["transferred"] > 0 and during["ram"]["dirty-sync-count"] >= 1, f"no progress in query-migrate: {during}")
    # A second migrate while this one runs is refused, as in QEMU.
    try:
        await src.execute("migrate", {"uri": uri})
        raise AssertionError("a second migrate was accepted during a migration")
    except AssertionError:
        raise
    except Exception as e:  # qemu.qmp's ExecuteError
        check("in progress" in str(e), f"unexpected refusal: {e}")
    await src.execute("migrate_cancel")
    src_end = await migration_events(src, src_log, ("completed", "failed", "cancelled"))
    dst_end = await migration_events(dst, dst_log, ("completed", "failed", "cancelled"))
    out["cancel"] = {"source-events": src_log, "destination-events": dst_log, "during": during,
                     "source-info": await src.execute("query-migrate"),
                     "destination-info": await dst.execute("query-migrate"),
                     "source-status": await src.execute("query-status")}
    check(src_end == "cancelled", f"source ended {src_end}")
    check(dst_end in ("failed", "cancelled"), f"destination ended {dst_end}")


async def postcopy(src, dst, uri, out):
    src_log, dst_log = [], []
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": True}]})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 32 << 20})
    await set_destination(dst)
    # Before any migration there is nothing to switch.
    try:
        await src.execute("migrate-start-postcopy")
        raise AssertionError("migrate-start-postcopy was accepted before migrate")
    except AssertionError:
        raise
    except Exception as e:
        check("after migration has been started" in str(e), f"unexpected refusal: {e}")
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate", {"uri": uri})
    await first_pass(src, src_log)
    await src.execute("migrate-start-postcopy")
    src_end, dst_end = await asyncio.gather(
        migration_events(src, src_log, ("completed", "failed", "cancelled")),
        migration_events(dst, dst_log, ("completed", "failed", "cancelled")))
    out["postcopy"] = {"source-events": src_log, "destination-events": dst_log,
                       "source-info": await src.execute("query-migrate"),
                       "destination-info": await dst.execute("query-migrate")}
    check(src_end == "completed" and dst_end == "completed", f"ended {src_end} / {dst_end}: {out['postcopy']}")
    # Both sides pass through postcopy-active, as two QEMUs do.
    def statuses(log):
        return [e["data"]["status"] for e in log if e["event"] == "MIGRATION"]
    check("postcopy-active" in statuses(src_log) and "postcopy-active" in statuses(dst_log),
          f"no postcopy-active: {statuses(src_log)} / {statuses(dst_log)}")


async def main():
    scenario, src_addr, dst_addr, uri = sys.argv[1:5]
    src, dst = QMPClient("source"), QMPClient("destination")
    await src.connect(address(src_addr))
    await dst.connect(address(dst_addr))
    out = {"greeting": json.loads(bytes(src.greeting._raw)) if src.greeting else None}
    if scenario == "complete":
        await set_source(src, 0)
        await set_destination(dst)
        await migrate(src, dst, uri, out, "complete")
    elif scenario in ("cancel", "retry"):
        await set_source(src, 16 << 20)
        await set_destination(dst)
        await cancel(src, dst, uri, out)
        if scenario == "retry":
            await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
            await migrate(src, dst, uri, out, "complete")
    elif scenario == "postcopy":
        await postcopy(src, dst, uri, out)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    for client in (src, dst):
        await client.execute("quit")
        try:
            await client.disconnect()
        except (EOFError, ConnectionError):
            pass  # the process closed the connection first, as QEMU does after quit
    print(json.dumps(out, sort_keys=True))


asyncio.run(main())
