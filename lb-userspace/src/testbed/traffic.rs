//! The pods' servers (a python3 script) and the clients the tests use.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::netns::in_netns;

/// Port of the pods' HTTP server.
pub const HTTP_PORT: u16 = 8080;
/// Port of the pods' UDP echo-the-name server.
pub const UDP_PORT: u16 = 5353;
/// Client timeout of `http_get`, `udp_request` and persistent clients.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// `python3 -c SERVER_PY NAME READY_FILE HTTP_PORT UDP_PORT` (the pods' own servers: 8080 and
/// 5353): HTTP/1.1 (keep-alive) answering every GET with NAME (`GET /client`: "NAME
/// CLIENT-ADDRESS", the source the server sees; a POST: "NAME BODY-LENGTH"), UDP answering
/// every datagram with NAME, from the address it was sent to. Creates READY_FILE once
/// both sockets listen. `server_bind` is overridden to skip `getfqdn()`, which can stall
/// on DNS inside an isolated namespace.
pub(crate) const SERVER_PY: &str = r#"
import socket, socketserver, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, ready = sys.argv[1], sys.argv[2]
body = name.encode()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self, data):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path == "/client":
            self.answer(("%s %s" % (name, self.client_address[0])).encode())
        else:
            self.answer(body)
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        received = self.rfile.read(length)
        self.answer(("%s %d" % (name, len(received))).encode())
    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "pod", self.server_address[1]

httpd = Server(("0.0.0.0", int(sys.argv[3])), Handler)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
udp.bind(("0.0.0.0", int(sys.argv[4])))
# Answer from the address each datagram was sent to, as DNS servers do (IP_PKTINFO): a
# wildcard socket would otherwise pick its source by route, e.g. a host-network server
# answering a pod on its own node from the veth's gateway address.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)

def udp_loop():
    while True:
        try:
            _, anc, _, peer = udp.recvmsg(65535, socket.CMSG_SPACE(12))
            info = [d for (lvl, typ, d) in anc if lvl == socket.IPPROTO_IP and typ == IP_PKTINFO]
            if info:
                # struct in_pktinfo { ifindex; spec_dst; addr }: reply from addr.
                pktinfo = [(socket.IPPROTO_IP, IP_PKTINFO, bytes(4) + info[0][8:12] + bytes(4))]
                udp.sendmsg([body], pktinfo, 0, peer)
            else:
                udp.sendto(body, peer)
        except OSError:
            pass

threading.Thread(target=udp_loop, daemon=True).start()
open(ready, "w").close()
httpd.serve_forever()
"#;

/// python3 to run the servers with: `$XLB_TESTBED_PYTHON`, else /usr/bin/python3 (does
/// not depend on PATH, which sudo and CI may reset), else `python3`.
pub(crate) fn python() -> String {
    if let Ok(p) = std::env::var("XLB_TESTBED_PYTHON") {
        return p;
    }
    if Path::new("/usr/bin/python3").exists() {
        return "/usr/bin/python3".into();
    }
    "python3".into()
}

/// One datagram to `ip:port` from a socket in `netns`, connected so that only a reply
/// from exactly `ip:port` counts (a missing reverse NAT shows up as a timeout).
pub(crate) fn udp_request(netns: &str, ip: Ipv4Addr, port: u16) -> Result<String> {
    in_netns(netns, || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sock.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        sock.connect((ip, port))?;
        sock.send(b"ping")?;
        let mut buf = [0u8; 2048];
        let n = sock
            .recv(&mut buf)
            .with_context(|| format!("UDP {ip}:{port} from {netns}: no reply"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// One TCP connection (HTTP/1.1 keep-alive) opened from a namespace; each
/// [`request`](Self::request) sends `GET /` on it and returns the body. Closed on drop.
pub struct PersistentClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    target: SocketAddrV4,
}

impl PersistentClient {
    pub(crate) fn connect(netns: &str, ip: Ipv4Addr, port: u16) -> Result<Self> {
        let target = SocketAddrV4::new(ip, port);
        let stream = in_netns(netns, || {
            TcpStream::connect_timeout(&SocketAddr::V4(target), CLIENT_TIMEOUT)
                .with_context(|| format!("TCP connect to {target} from {netns}"))
        })?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            target,
        })
    }

    /// The client side of the connection (for conntrack assertions).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }

    /// `GET /` on the same connection; the body (the answering pod's name).
    pub fn request(&mut self) -> Result<String> {
        let target = self.target;
        write!(
            self.writer,
            "GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: xlb-testbed\r\n\r\n"
        )
        .with_context(|| format!("sending to {target}"))?;
        let mut line = String::new();
        let mut read_line = |line: &mut String| -> Result<()> {
            line.clear();
            let n = self
                .reader
                .read_line(line)
                .with_context(|| format!("reading from {target}"))?;
            if n == 0 {
                bail!("{target} closed the connection");
            }
            Ok(())
        };
        read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("{target}: unexpected status line {:?}", line.trim_end());
        }
        let mut length = None;
        loop {
            read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = Some(v.trim().parse::<usize>().context("Content-Length")?);
                }
            }
        }
        let length = length.with_context(|| format!("{target}: no Content-Length"))?;
        let mut body = vec![0u8; length];
        self.reader
            .read_exact(&mut body)
            .with_context(|| format!("reading body from {target}"))?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}
