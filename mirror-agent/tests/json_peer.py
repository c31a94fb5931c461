"""A JSON service for the content-comparison tests: `json_peer.py VERSION HOST PORT`.

v1 answers books with a rating and a price; v5 rounds the rating and renames price to cost.
Every answer carries servedAt and a random requestId: noise that differs on every answer.
"""
import json
import random
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
RATINGS = [4.5, 3.8, 4.2, 4.7, 3.9]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        body = {"servedAt": time.time_ns(), "requestId": "%016x" % random.getrandbits(64)}
        if len(parts) == 3 and parts[:2] == ["api", "books"]:
            i = int(parts[2])
            body["id"] = i
            rating = RATINGS[(i - 1) % len(RATINGS)]
            body["rating"] = float(round(rating)) if VERSION == "v5" else rating
            body["cost" if VERSION == "v5" else "price"] = 9.5 + i
        elif len(parts) == 3 and parts[:2] == ["api", "authors"]:
            body["id"] = int(parts[2])
            body["name"] = "Jane Austen"
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
