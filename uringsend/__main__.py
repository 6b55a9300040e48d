"""python -m uringsend: a minimal end-to-end send with release events (full demos to come)."""
import os
import socket
import sys
import tempfile
import threading

import uringsend


def main(argv=None):
    size = 4 << 20
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(size))
        f.flush()
        srv = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
        srv.close()
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(b"".join(iter(lambda: peer.recv(1 << 20), b""))))
        reader.start()
        with uringsend.Ring() as ring:
            t = ring.sendfile(client, f.name, mode="mmap")
            t.wait_released(30)
        client.shutdown(socket.SHUT_WR)
        reader.join()
        client.close()
        peer.close()
        for e in t.events:
            print(f"{(e.t_ns - t.started_ns) / 1000:10.1f} us  {e.kind:8} offset {e.offset:>9} "
                  f"{e.nbytes:>8} bytes{'  copied' if e.copied else ''}")
        f.seek(0)
        ok = bytes(got) == f.read()
        print(f"{t.sent} bytes sent, {len(t.events)} events, peer data {'identical' if ok else 'DIFFERENT'}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
