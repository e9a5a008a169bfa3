//! The IP side of the board: smoltcp over the Wi-Fi station interface, an address by DHCP, and
//! one TCP socket that carries the MQTT session as its [`Link`].
//!
//! Nothing here blocks. [`Net::poll`] moves packets between the radio and smoltcp and follows
//! the Wi-Fi link and the DHCP lease; the session's reads and writes poll the stack too, so a
//! CONNECT written while the TCP handshake is still under way is held back and sent once the
//! connection is up. A lost Wi-Fi link or DHCP lease aborts the socket at once, so the session
//! sees its link closed and reconnects with its own backoff. Each new connection goes to the
//! next gateway of the list ([`Gateways`]): the first at start, another after every failed
//! connect or lost session. Not here: DNS (gateways are addresses), TLS, IPv6.

use core::fmt;
use core::net::SocketAddrV4;
use core::task::{Context, Waker};

use embassy_net_driver::{Driver, LinkState};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};
use watchpost_firmware::gateways::Gateways;
use watchpost_firmware::mqtt::{Link, PACKET_MAX};

/// Bytes the TCP socket buffers each way. The session has at most one PUBLISH (at most
/// [`PACKET_MAX`] bytes) and one PINGREQ unacknowledged, and reads only short acknowledgements.
pub const TCP_RX: usize = 512;
/// See [`TCP_RX`].
pub const TCP_TX: usize = 1024;

/// The memory the stack keeps for its lifetime: two sockets (DHCP, TCP) and the TCP buffers.
pub struct Storage {
    sockets: [SocketStorage<'static>; 2],
    rx: [u8; TCP_RX],
    tx: [u8; TCP_TX],
}

impl Storage {
    /// Empty storage, to be put in a `static`.
    pub const fn new() -> Self {
        Self {
            sockets: [SocketStorage::EMPTY; 2],
            rx: [0; TCP_RX],
            tx: [0; TCP_TX],
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since boot, from esp-hal's system timer.
pub fn now_ms() -> u64 {
    esp_hal::time::Instant::now()
        .duration_since_epoch()
        .as_millis()
}

fn stamp() -> Instant {
    Instant::from_millis(now_ms() as i64)
}

/// A network driver of the embassy-net-driver interface (the radio's station interface) as a
/// smoltcp device. The driver's wakers are not needed: the main loop polls every tick.
pub struct Phy<D>(D);

/// A received frame of [`Phy`].
pub struct Rx<T>(T);
/// A frame to send of [`Phy`].
pub struct Tx<T>(T);

impl<T: embassy_net_driver::RxToken> smoltcp::phy::RxToken for Rx<T> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        self.0.consume(|frame| f(frame))
    }
}

impl<T: embassy_net_driver::TxToken> smoltcp::phy::TxToken for Tx<T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.consume(len, f)
    }
}

impl<D: Driver> Phy<D> {
    fn link_up(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.0.link_state(&mut cx) == LinkState::Up
    }
}

impl<D: Driver> Device for Phy<D> {
    type RxToken<'a>
        = Rx<D::RxToken<'a>>
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<D::TxToken<'a>>
    where
        Self: 'a;

    fn receive(&mut self, _: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let mut cx = Context::from_waker(Waker::noop());
        self.0.receive(&mut cx).map(|(rx, tx)| (Rx(rx), Tx(tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Self::TxToken<'_>> {
        let mut cx = Context::from_waker(Waker::noop());
        self.0.transmit(&mut cx).map(Tx)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let driver = self.0.capabilities();
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = driver.max_transmission_unit;
        caps.max_burst_size = driver.max_burst_size;
        caps
    }
}

/// What changed in one [`Net::poll`], for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetEvent {
    /// The Wi-Fi link came up; DHCP starts.
    LinkUp,
    /// The Wi-Fi link went down; the address is gone and the TCP connection with it.
    LinkDown,
    /// DHCP gave this address.
    Address(Ipv4Cidr),
    /// The DHCP lease was lost.
    AddressLost,
}

/// Why the MQTT link failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetError {
    /// No Wi-Fi link, or no address from DHCP yet.
    NoNetwork,
    /// smoltcp refused to open the connection.
    Connect(tcp::ConnectError),
    /// The connection is not open (refused, reset, timed out or never opened).
    NotConnected,
    /// The send buffer is full: the gateway stopped reading.
    Full,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::NoNetwork => f.write_str("no network: waiting for Wi-Fi and DHCP"),
            NetError::Connect(e) => write!(f, "cannot connect: {e}"),
            NetError::NotConnected => f.write_str("TCP connection not open"),
            NetError::Full => f.write_str("TCP send buffer full"),
        }
    }
}

impl embedded_io::Error for NetError {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            NetError::NoNetwork | NetError::NotConnected => embedded_io::ErrorKind::NotConnected,
            NetError::Connect(_) => embedded_io::ErrorKind::ConnectionRefused,
            NetError::Full => embedded_io::ErrorKind::OutOfMemory,
        }
    }
}

/// The IP stack on the Wi-Fi station and the MQTT session's TCP link to the gateway.
pub struct Net<D: Driver> {
    phy: Phy<D>,
    iface: Interface,
    sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    tcp: SocketHandle,
    link_up: bool,
    address: Option<Ipv4Cidr>,
    gateways: Gateways<'static, SocketAddrV4>,
    local_port: u16,
    /// A connection was opened since the last reopen: once it is closed, reads see the end.
    opened: bool,
    /// Bytes written while the handshake is under way, sent once the connection is up.
    held: [u8; PACKET_MAX],
    held_len: usize,
}

impl<D: Driver> Net<D> {
    /// A stack on `driver` whose MQTT link goes to the `gateways` in turn. `seed` must differ
    /// per boot (TCP sequence numbers, DHCP transaction ids, local ports).
    pub fn new(
        driver: D,
        storage: &'static mut Storage,
        gateways: Gateways<'static, SocketAddrV4>,
        seed: u64,
    ) -> Self {
        let mut phy = Phy(driver);
        let mac = match phy.0.hardware_address() {
            embassy_net_driver::HardwareAddress::Ethernet(mac) => mac,
            _ => panic!("the Wi-Fi station is an Ethernet-like interface"),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = seed;
        let iface = Interface::new(config, &mut phy, stamp());
        let Storage { sockets, rx, tx } = storage;
        let mut sockets = SocketSet::new(&mut sockets[..]);
        let dhcp = sockets.add(dhcpv4::Socket::new());
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(&mut rx[..]),
            tcp::SocketBuffer::new(&mut tx[..]),
        );
        // MQTT packets are small and each one is wanted on the wire at once.
        socket.set_nagle_enabled(false);
        let tcp = sockets.add(socket);
        Self {
            phy,
            iface,
            sockets,
            dhcp,
            tcp,
            link_up: false,
            address: None,
            gateways,
            // An ephemeral port (49152..=65535) that differs per boot.
            local_port: 49_152 + (seed % 16_384) as u16,
            opened: false,
            held: [0; PACKET_MAX],
            held_len: 0,
        }
    }

    /// True while the station is associated and has an address: only then can the link open.
    pub fn is_up(&self) -> bool {
        self.link_up && self.address.is_some()
    }

    /// The gateway the link connects (or last connected) to, and its place in the list.
    pub fn gateway(&self) -> (usize, SocketAddrV4) {
        let (index, address) = self.gateways.current();
        (index, *address)
    }

    /// Number of gateways in the list.
    pub fn gateway_count(&self) -> usize {
        self.gateways.list().len()
    }

    /// Moves packets, follows the Wi-Fi link and the DHCP lease; call every tick. Returns what
    /// changed, if anything.
    pub fn poll(&mut self) -> Option<NetEvent> {
        let mut event = None;
        let up = self.phy.link_up();
        if up != self.link_up {
            self.link_up = up;
            if up {
                event = Some(NetEvent::LinkUp);
            } else {
                // A new association needs a new lease, and the old connection is gone.
                self.sockets.get_mut::<dhcpv4::Socket>(self.dhcp).reset();
                self.forget_address();
                event = Some(NetEvent::LinkDown);
            }
        }
        self.step();
        let lease = match self.sockets.get_mut::<dhcpv4::Socket>(self.dhcp).poll() {
            None => None,
            Some(dhcpv4::Event::Configured(config)) => Some(Some((config.address, config.router))),
            Some(dhcpv4::Event::Deconfigured) => Some(None),
        };
        match lease {
            None => {}
            Some(Some((address, router))) => {
                if self.address != Some(address) {
                    self.forget_address();
                }
                self.iface.update_ip_addrs(|addrs| {
                    addrs.clear();
                    // One address fits any interface.
                    let _ = addrs.push(IpCidr::Ipv4(address));
                });
                match router {
                    Some(router) => {
                        // Cannot fail: the route table keeps the default route.
                        let _ = self.iface.routes_mut().add_default_ipv4_route(router);
                    }
                    None => {
                        self.iface.routes_mut().remove_default_ipv4_route();
                    }
                }
                self.address = Some(address);
                event = Some(NetEvent::Address(address));
            }
            Some(None) => {
                self.forget_address();
                event = Some(NetEvent::AddressLost);
            }
        }
        event
    }

    /// Drops the address and the route, and aborts the TCP connection that used them.
    fn forget_address(&mut self) {
        self.iface.update_ip_addrs(|addrs| addrs.clear());
        self.iface.routes_mut().remove_default_ipv4_route();
        self.address = None;
        self.sockets.get_mut::<tcp::Socket>(self.tcp).abort();
        self.held_len = 0;
    }

    /// One pass of the stack, then whatever was held back if the connection is now up.
    fn step(&mut self) {
        self.iface.poll(stamp(), &mut self.phy, &mut self.sockets);
        if self.held_len > 0 {
            let socket = self.sockets.get_mut::<tcp::Socket>(self.tcp);
            if socket.may_send() {
                let n = socket.send_slice(&self.held[..self.held_len]).unwrap_or(0);
                self.held.copy_within(n..self.held_len, 0);
                self.held_len -= n;
                self.iface.poll(stamp(), &mut self.phy, &mut self.sockets);
            }
        }
    }
}

impl<D: Driver> embedded_io::ErrorType for Net<D> {
    type Error = NetError;
}

impl<D: Driver> embedded_io::ReadReady for Net<D> {
    fn read_ready(&mut self) -> Result<bool, NetError> {
        self.step();
        let socket = self.sockets.get::<tcp::Socket>(self.tcp);
        if socket.can_recv() {
            return Ok(true);
        }
        // Once a connection was opened, its end (refused, reset, closed, timed out) is
        // something to read: a read then returns 0 and the session sees the link closed.
        Ok(self.opened
            && !matches!(
                socket.state(),
                tcp::State::SynSent
                    | tcp::State::SynReceived
                    | tcp::State::Established
                    | tcp::State::FinWait1
                    | tcp::State::FinWait2
            ))
    }
}

impl<D: Driver> embedded_io::Read for Net<D> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        let socket = self.sockets.get_mut::<tcp::Socket>(self.tcp);
        if !socket.can_recv() {
            return Ok(0);
        }
        socket.recv_slice(buf).map_err(|_| NetError::NotConnected)
    }
}

impl<D: Driver> embedded_io::Write for Net<D> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, NetError> {
        self.step();
        let socket = self.sockets.get_mut::<tcp::Socket>(self.tcp);
        match socket.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                let n = buf.len().min(self.held.len() - self.held_len);
                if n == 0 {
                    return Err(NetError::Full);
                }
                self.held[self.held_len..self.held_len + n].copy_from_slice(&buf[..n]);
                self.held_len += n;
                Ok(n)
            }
            _ if socket.may_send() && self.held_len == 0 => match socket.send_slice(buf) {
                Ok(0) if !buf.is_empty() => Err(NetError::Full),
                Ok(n) => Ok(n),
                Err(_) => Err(NetError::NotConnected),
            },
            _ if socket.may_send() => Err(NetError::Full),
            _ => Err(NetError::NotConnected),
        }
    }

    fn flush(&mut self) -> Result<(), NetError> {
        self.step();
        Ok(())
    }
}

impl<D: Driver> Link for Net<D> {
    /// Aborts the previous connection (a reset goes out) and opens a new one to the next
    /// gateway of the list; without a network it fails and the list stays where it is. The
    /// handshake completes in later polls; what the session writes meanwhile is held.
    fn reopen(&mut self) -> Result<(), NetError> {
        self.sockets.get_mut::<tcp::Socket>(self.tcp).abort();
        self.held_len = 0;
        self.opened = false;
        self.step();
        if !self.link_up || self.address.is_none() {
            return Err(NetError::NoNetwork);
        }
        self.local_port = if self.local_port == u16::MAX {
            49_152
        } else {
            self.local_port + 1
        };
        let gateway = self.gateways.next_address();
        let remote = (*gateway.ip(), gateway.port());
        let socket = self.sockets.get_mut::<tcp::Socket>(self.tcp);
        socket
            .connect(self.iface.context(), remote, self.local_port)
            .map_err(NetError::Connect)?;
        self.opened = true;
        self.step();
        Ok(())
    }
}
