"""Chat: bidirectional streams, durable delivery with per-device cursors, receipts, presence,
groups and attachments (`protos/sysdesign/chat/v1/chat.proto`).

- ``tables.py``       the table-port schema (messages bucketed by Snowflake time)
- ``validation.py``   input rules, each reported as a field violation
- ``core.py``         conversations, sends (persist before ack), history, cursors, receipts
- ``hub.py``          the per-process session hub: session registry in Redis, routing
                      between instances over pub/sub, presence
- ``session.py``      one device's stream: replay → live handoff, per-event errors
- ``attachments.py``  uploads to the blob port and signed download URLs on the edge
- ``service.py``      the gRPC servicer
"""
