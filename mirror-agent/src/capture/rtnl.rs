//! Link and route operations over rtnetlink, with no iproute2 and no writes under `/proc/sys`:
//! container runtimes mount `/proc/sys` read-only in every non-privileged container, while
//! rtnetlink needs only CAP_NET_ADMIN.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute,
    LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A failed rtnetlink operation: what was asked, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("{op}")]
pub struct RtnlError {
    pub op: String,
    #[source]
    pub source: io::Error,
}

impl RtnlError {
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }

    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// A route socket in the calling thread's network namespace.
struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends one request and collects the replies until the kernel's acknowledgement.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq += 1;
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        packet.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        packet.header.sequence_number = self.seq;
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut replies = Vec::new();
        let mut rx = Vec::with_capacity(1 << 16);
        loop {
            rx.clear();
            let size = self.socket.recv(&mut rx, 0)?;
            let mut at = 0;
            while at < size {
                let reply: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&rx[at..size])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    match reply.payload {
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(replies),
                                Some(_) => Err(e.to_io()),
                            }
                        }
                        NetlinkPayload::Done(_) => return Ok(replies),
                        NetlinkPayload::InnerMessage(m) => replies.push(m),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }
}

fn run(
    op: impl FnOnce() -> String,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
    Rtnl::open()
        .and_then(|mut r| r.request(msg, flags))
        .map_err(|source| RtnlError { op: op(), source })
}

fn link(index: u32, attributes: Vec<LinkAttribute>) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes = attributes;
    m
}

/// Creates a veth pair: `name` in this namespace with interface index `index`, and `peer` in the
/// network namespace open at `peer_netns`. Both ends get the largest MTU, so that no clone is
/// too big for the pair.
pub fn create_veth(
    name: &str,
    index: u32,
    peer: &str,
    peer_netns: std::os::fd::RawFd,
) -> Result<(), RtnlError> {
    let peer_ns = LinkAttribute::NetNsFd(peer_netns);
    const MTU: u32 = 65535;
    let peer_msg = link(
        0,
        vec![
            LinkAttribute::IfName(peer.into()),
            LinkAttribute::Mtu(MTU),
            peer_ns,
        ],
    );
    let msg = link(
        index,
        vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Mtu(MTU),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
            ]),
        ],
    );
    run(
        || format!("creating the veth pair {name} (index {index}) / {peer}"),
        RouteNetlinkMessage::NewLink(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
}

/// Keeps IPv6 quiet on `index`: no address generated, hence no duplicate address detection, no
/// router solicitations and no multicast reports on the mirror veth. Call it before the link is
/// up. A kernel without IPv6 has nothing to quieten.
pub fn quiet_ipv6(name: &str, index: u32) -> Result<(), RtnlError> {
    let msg = link(
        index,
        vec![LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
            vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
        )])],
    );
    match run(
        || format!("turning IPv6 address generation off on {name}"),
        RouteNetlinkMessage::SetLink(msg),
        0,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => Ok(()),
        other => other.map(drop),
    }
}

/// Deletes the link with this index.
pub fn delete_link(name: &str, index: u32) -> Result<(), RtnlError> {
    run(
        || format!("deleting {name}"),
        RouteNetlinkMessage::DelLink(link(index, Vec::new())),
        0,
    )
    .map(drop)
}

/// The route the kernel would use to reach `ip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub kind: RouteType,
}

/// Looks up the route to `ip` (as `ip route get` does).
pub fn route_get(ip: IpAddr) -> Result<Route, RtnlError> {
    let mut m = RouteMessage::default();
    m.header.address_family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
    m.attributes = vec![RouteAttribute::Destination(RouteAddress::from(ip))];
    let replies = run(
        || format!("looking up the route to {ip}"),
        RouteNetlinkMessage::GetRoute(m),
        0,
    )?;
    let route = replies
        .into_iter()
        .find_map(|r| match r {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        })
        .ok_or_else(|| RtnlError {
            op: format!("looking up the route to {ip}"),
            source: io::Error::new(io::ErrorKind::NotFound, "no route in the reply"),
        })?;
    let mut out = Route {
        oif: None,
        gateway: None,
        kind: route.header.kind,
    };
    for a in route.attributes {
        match a {
            RouteAttribute::Oif(i) => out.oif = Some(i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => out.gateway = Some(g.into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => out.gateway = Some(g.into()),
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_routes_are_local() {
        // Needs no privilege: a route lookup is a read.
        let r = route_get("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(r.kind, RouteType::Local);
        assert_eq!(r.gateway, None);
        assert!(r.oif.is_some());
    }
}
