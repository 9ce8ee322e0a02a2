"""A tiny WSGI app for the gunicorn example (and the netns tier): answers
every request with the listener, shard and pid that served it."""
import os

_BODY = "portfleet listener={} shard={} pid={{}}".format(
    os.environ.get("PORTFLEET_LISTENER", "?"),
    os.environ.get("PORTFLEET_SHARD", "0"))


def app(environ, start_response):
    body = _BODY.format(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
