# A mirror in Python's http.server: logs each request's method, path and body length, and
# answers "ok". The replay tests send it pipelined batches.
import http.server, socketserver, sys
log = open(sys.argv[1], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        log.write(f"{self.command} {self.path} {len(body)}\n")
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops the connections of a burst. The agent may open one per
    # request in flight (--max-inflight, 256) when answers are slow, as under emulation, where
    # a backlog of 128 overflowed (TcpExtListenOverflows) and 16 requests timed out unanswered.
    request_queue_size = 1024
S(("127.0.0.1", 9091), H).serve_forever()
