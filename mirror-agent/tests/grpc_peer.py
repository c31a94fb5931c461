#!/usr/bin/python3
"""gRPC peers for the HTTP/2 end-to-end tests (grpcio, h2c).

serve:  a generic service that takes any method of /test.Echo, logs each call as one JSON line
        (method, metadata, request messages as hex) and answers. Methods by name: Unary* are
        unary, ServerStream streams three answers back, ClientStream takes a stream, Bidi both.
        --fail METHOD answers INTERNAL, --delay METHOD=SECONDS sleeps first.
client: makes the calls of a scenario on one channel (one connection) and prints, as JSON
        lines, what it sent, so that the test can compare it with the mirror's log.
"""

import argparse
import concurrent.futures
import json
import sys
import threading
import time

import grpc

SERVICE = "/test.Echo/"


def serve(args):
    log = open(args.log, "a", buffering=1) if args.log else None
    lock = threading.Lock()
    delays = dict((d.split("=")[0], float(d.split("=")[1])) for d in args.delay)

    def record(method, context, messages, arrivals=()):
        if log:
            line = json.dumps({
                "method": method,
                "metadata": sorted([k, v if isinstance(v, str) else v.hex()]
                                   for k, v in context.invocation_metadata()),
                "messages": [m.hex() for m in messages],
                "arrivals": list(arrivals),
            })
            with lock:
                log.write(line + "\n")

    def behave(method, context):
        name = method[len(SERVICE):]
        if name in delays:
            time.sleep(delays[name])
        if name in args.fail:
            context.abort(grpc.StatusCode.INTERNAL, "injected failure")

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            method = details.method
            if not method.startswith(SERVICE):
                return None
            name = method[len(SERVICE):]

            if name.startswith("Unary"):
                def unary(request, context):
                    record(method, context, [request])
                    behave(method, context)
                    return b"ok:" + request[:16]
                return grpc.unary_unary_rpc_method_handler(unary)
            if name == "ServerStream":
                def server_stream(request, context):
                    record(method, context, [request])
                    behave(method, context)
                    for i in range(3):
                        yield b"part-%d" % i
                return grpc.unary_stream_rpc_method_handler(server_stream)
            if name == "ClientStream":
                def client_stream(requests, context):
                    messages, arrivals = [], []
                    for m in requests:
                        messages.append(m)
                        arrivals.append(time.time())
                    record(method, context, messages, arrivals)
                    behave(method, context)
                    return b"got %d" % len(messages)
                return grpc.stream_unary_rpc_method_handler(client_stream)
            if name == "Bidi":
                def bidi(requests, context):
                    messages, arrivals = [], []
                    for m in requests:
                        messages.append(m)
                        arrivals.append(time.time())
                        yield b"echo:" + m[:8]
                    record(method, context, messages, arrivals)
                return grpc.stream_stream_rpc_method_handler(bidi)
            return None

    options = [("grpc.max_receive_message_length", 8 << 20),
               ("grpc.max_send_message_length", 8 << 20)]
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=32),
                         options=options, maximum_concurrent_rpcs=256)
    server.add_generic_rpc_handlers((Handler(),))
    for b in args.bind:
        if args.tls_cert:
            key = open(args.tls_key, "rb").read()
            cert = open(args.tls_cert, "rb").read()
            server.add_secure_port(b, grpc.ssl_server_credentials([(key, cert)]))
        else:
            server.add_insecure_port(b)
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def message(i, size):
    return bytes((i * 7 + j * 13) & 0xFF for j in range(size))


def client(args):
    options = [("grpc.max_receive_message_length", 8 << 20),
               ("grpc.max_send_message_length", 8 << 20)]
    if args.tls_ca:
        # gRPC over TLS, to a server whose certificate names --tls-name.
        creds = grpc.ssl_channel_credentials(root_certificates=open(args.tls_ca, "rb").read())
        options.append(("grpc.ssl_target_name_override", args.tls_name))
        channel = grpc.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.target, options=options)
    grpc.channel_ready_future(channel).result(timeout=10)
    sent = []
    results = []

    def note(method, metadata, messages, code):
        sent.append({"method": SERVICE + method,
                     "metadata": sorted([k, v] for k, v in metadata),
                     "messages": [m.hex() for m in messages]})
        results.append(code)

    def unary(method, i, size, extra=()):
        md = [("x-request-id", "%s-%d-%d" % (method, args.seed, i)),
              ("x-tenant", "tenant-%d" % (i % 3))] + list(extra)
        body = message(i, size)
        call = channel.unary_unary(SERVICE + method)
        try:
            call(body, metadata=md, timeout=20)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        note(method, md, [body], code)

    for scenario in args.scenario:
        if scenario == "unary":
            with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
                list(pool.map(lambda i: unary("Unary", i, 10 + i * 37 % 500),
                              range(args.calls)))
        elif scenario == "methods":
            for i in range(args.calls):
                for m in ("UnaryA", "UnaryB", "UnaryC"):
                    unary(m, i, 20)
        elif scenario == "streams":
            md = [("x-request-id", "ss-%d" % args.seed)]
            body = message(1, 64)
            answers = list(channel.unary_stream(SERVICE + "ServerStream")(
                body, metadata=md, timeout=20))
            note("ServerStream", md, [body], "OK" if len(answers) == 3 else "BAD")
            md = [("x-request-id", "cs-%d" % args.seed)]
            parts = [message(i, 100 + i) for i in range(5)]
            channel.stream_unary(SERVICE + "ClientStream")(
                iter(parts), metadata=md, timeout=20)
            note("ClientStream", md, parts, "OK")
            md = [("x-request-id", "bd-%d" % args.seed)]
            parts = [message(i, 30) for i in range(4)]
            echoed = list(channel.stream_stream(SERVICE + "Bidi")(
                iter(parts), metadata=md, timeout=20))
            note("Bidi", md, parts, "OK" if len(echoed) == 4 else "BAD")
        elif scenario == "churn":
            # Large metadata values that differ per call: the encoder's table turns over, and
            # fields it held before are inserted again.
            for i in range(args.calls):
                unary("UnaryChurn", i, 20, [("x-blob", ("%04d" % i) * 150)])
        elif scenario == "slowstreams":
            # Messages 100 ms apart: the mirror should get each as it is sent.
            def paced(parts):
                for p in parts:
                    yield p
                    time.sleep(0.1)
            md = [("x-request-id", "slow-cs-%d" % args.seed)]
            parts = [message(i, 1000 + i) for i in range(6)]
            channel.stream_unary(SERVICE + "ClientStream")(paced(parts), metadata=md, timeout=20)
            note("ClientStream", md, parts, "OK")
            md = [("x-request-id", "slow-bd-%d" % args.seed)]
            parts = [message(i, 50) for i in range(6)]
            echoed = list(channel.stream_stream(SERVICE + "Bidi")(paced(parts), metadata=md,
                                                                   timeout=20))
            note("Bidi", md, parts, "OK" if len(echoed) == 6 else "BAD")
        elif scenario == "big":
            unary("UnaryBig", 1, 1 << 20)
        elif scenario == "pause":
            # The test starts the agent now: the channel's HPACK tables are already filled.
            print("paused", flush=True)
            sys.stdin.readline()
    for s, r in zip(sent, results):
        s["code"] = r
        print(json.dumps(s), flush=True)
    channel.close()


def h2client(args):
    """Unary gRPC calls over python-hyper's h2 on one connection. Its HPACK encoder indexes
    every field, so that large metadata that differs per call turns the table over."""
    import socket
    import h2.config
    import h2.connection
    import h2.events

    host, port = args.target.rsplit(":", 1)
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=20)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sent = []

    # Each call's id is new metadata on the connection: after a pause, under a name never sent
    # before it (an observer that joined in the pause could not learn an older name).
    id_key = "x-request-id"

    def call(i, extra):
        sid = conn.get_next_available_stream_id()
        md = [(id_key, "h2-%d-%d" % (args.seed, i)), ("x-tenant", "t%d" % (i % 2))]
        md += extra
        body = message(i, 40)
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                (":path", SERVICE + "UnaryH2"), (":authority", args.target),
                                ("content-type", "application/grpc"), ("te", "trailers")] + md)
        conn.send_data(sid, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("server closed")
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.StreamEnded) and e.stream_id == sid:
                    done = True
                elif isinstance(e, h2.events.DataReceived):
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            sock.sendall(conn.data_to_send())
        sent.append({"method": SERVICE + "UnaryH2", "metadata": sorted([k, v] for k, v in md),
                     "messages": [body.hex()], "code": "OK"})

    n = 0
    for scenario in args.scenario:
        if scenario == "calls":
            for _ in range(args.calls):
                call(n, [])
                n += 1
        elif scenario == "churn":
            for _ in range(args.calls):
                call(n, [("x-blob", ("%04d" % n) * 150)])
                n += 1
        elif scenario == "pause":
            print("paused", flush=True)
            sys.stdin.readline()
            id_key = "x-call-id"
    for s in sent:
        print(json.dumps(s), flush=True)
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", action="append", required=True)
    s.add_argument("--log")
    s.add_argument("--fail", action="append", default=[])
    s.add_argument("--delay", action="append", default=[])
    s.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    s.add_argument("--tls-key", help="the key of --tls-cert (PEM)")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--calls", type=int, default=20)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tls-ca", help="speak TLS, trusting this CA certificate")
    c.add_argument("--tls-name", default="pod", help="the name the certificate carries")
    c.add_argument("scenario", nargs="+")
    h = sub.add_parser("h2client")
    h.add_argument("--target", required=True)
    h.add_argument("--calls", type=int, default=20)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("scenario", nargs="+")
    args = p.parse_args()
    {"serve": serve, "client": client, "h2client": h2client}[args.cmd](args)


if __name__ == "__main__":
    main()
