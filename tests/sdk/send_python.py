#!/usr/bin/env python3
"""Sends events to a running Switchyard with an official, unmodified Python SDK.

    send_python.py HOST WRITE_KEY RUN_ID [segment|rudder]

HOST is the base URL (http://127.0.0.1:PORT); the SDKs post to HOST/v1/batch. `segment` is
segment-analytics-python (write key in Basic auth and in the body), `rudder` is
rudder-sdk-python (gzip body, write key only in Basic auth).

Sends one identify, track, page, screen, group and alias, then 20 more tracks: 26 calls. The
SDK sets every messageId. Every call carries `context.run = RUN_ID` and `context.seq = n`
(0..25), and the same pair in its `properties` (track, page, screen) or `traits` (identify,
group); userId is `<sdk>-user-RUN_ID`.

Prints one JSON line: {"sdk", "sent", "failed", "message_ids"} (`failed` counts messages the
SDK gave up on). Exits 0 when the server accepted every batch, 1 when the SDK reported any
delivery error, 2 on bad usage.
"""
import json
import logging
import sys

EXTRA_TRACKS = 20


def make_client(sdk, host, write_key, on_error):
    if sdk == "segment":
        from segment.analytics import Client

        # Small retry budgets: a test wants a prompt failure, not the SDK's 12-hour default.
        return Client(
            write_key,
            host=host,
            on_error=on_error,
            max_retries=3,
            timeout=10,
            max_total_backoff_duration=30,
            max_rate_limit_duration=60,
        )
    from rudderstack.analytics import Client

    # host is the Client's name for the module-level `dataPlaneUrl`.
    return Client(write_key, host=host, on_error=on_error, max_retries=3, timeout=10)


def main(argv):
    if len(argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    host, write_key, run = argv[1], argv[2], argv[3]
    sdk = argv[4] if len(argv) == 5 else "segment"
    if sdk not in ("segment", "rudder"):
        print(f"unknown SDK {sdk!r}: expected segment or rudder", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    errors = []

    def on_error(error, batch):
        errors.append(len(batch))
        print(f"{sdk}: delivery of {len(batch)} message(s) failed: {error}", file=sys.stderr)

    client = make_client(sdk, host, write_key, on_error)
    user = f"{sdk}-user-{run}"
    message_ids = []
    seq = 0

    def tag():
        nonlocal seq
        mark = {"run": run, "seq": seq}
        seq += 1
        return mark

    def sent(result):
        # The Segment SDK returns (queued, message); rudder's returns nothing.
        if isinstance(result, tuple):
            queued, message = result
            if not queued:
                errors.append(1)
            message_ids.append(message["messageId"])

    t = tag()
    sent(client.identify(user, traits=dict(t, email=f"{run}@example.com"), context=dict(t)))
    t = tag()
    sent(client.track(user, "Signed Up", properties=dict(t, plan="pro"), context=dict(t)))
    t = tag()
    sent(client.page(user, "Docs", "Home", properties=dict(t, path="/"), context=dict(t)))
    t = tag()
    sent(client.screen(user, "App", "Main", properties=dict(t), context=dict(t)))
    t = tag()
    sent(client.group(user, f"group-{run}", traits=dict(t, plan="team"), context=dict(t)))
    t = tag()
    sent(client.alias(f"anon-{run}", user, context=dict(t)))
    for i in range(EXTRA_TRACKS):
        t = tag()
        sent(
            client.track(
                user, "Order Completed", properties=dict(t, revenue=i + 0.5), context=dict(t)
            )
        )

    client.flush()
    client.join()

    print(
        json.dumps(
            {"sdk": sdk, "sent": seq, "failed": sum(errors), "message_ids": message_ids}
        ),
        flush=True,
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
