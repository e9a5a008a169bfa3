//! Build-time configuration: the Wi-Fi network, the device id, the gateway credentials and the
//! gateway list, read from `WATCHPOST_*` environment variables when the image is compiled.
//!
//! Everything that can be checked is checked here, in constant evaluation, so that a bad value
//! fails the build with a message naming the variable instead of failing on the device. What is
//! not set falls back to a placeholder that still builds (CI builds without any of them): an
//! empty network name makes the board log an error and retry, never a build failure.

use core::net::{Ipv4Addr, SocketAddrV4};

/// Wi-Fi network name, `WATCHPOST_WIFI_SSID`; empty when not set.
pub const WIFI_SSID: &str = match option_env!("WATCHPOST_WIFI_SSID") {
    Some(ssid) => ssid,
    None => "",
};

/// Wi-Fi passphrase, `WATCHPOST_WIFI_PASSWORD`; empty for an open network.
pub const WIFI_PASSWORD: &str = match option_env!("WATCHPOST_WIFI_PASSWORD") {
    Some(password) => password,
    None => "",
};

/// Device id, `WATCHPOST_DEVICE_ID` (1 to 32 of `A-Z a-z 0-9 - _ .`, checked by `Node::new`).
pub const DEVICE: &str = match option_env!("WATCHPOST_DEVICE_ID") {
    Some(id) => id,
    None => "esp32c3-1",
};

/// Gateway credentials, `WATCHPOST_MQTT_USER` and `WATCHPOST_MQTT_PASSWORD` (both or neither).
pub const CREDENTIALS: Option<(&str, &str)> = match (
    option_env!("WATCHPOST_MQTT_USER"),
    option_env!("WATCHPOST_MQTT_PASSWORD"),
) {
    (Some(user), Some(password)) => Some((user, password)),
    _ => None,
};

/// The gateways' MQTT listeners as written in `WATCHPOST_GATEWAYS`: comma-separated
/// `IPv4:port` entries, tried in this order.
pub const GATEWAY_LIST: &str = match option_env!("WATCHPOST_GATEWAYS") {
    Some(list) => list,
    None => "192.168.1.10:1883",
};

/// [`GATEWAY_LIST`] parsed; a malformed entry is a compile-time error.
pub const GATEWAYS: [SocketAddrV4; entries(GATEWAY_LIST)] = parse_gateways(GATEWAY_LIST);

const _: () = assert!(
    WIFI_SSID.len() <= 32,
    "WATCHPOST_WIFI_SSID: a Wi-Fi network name is at most 32 bytes"
);
const _: () = assert!(
    WIFI_PASSWORD.is_empty() || (WIFI_PASSWORD.len() >= 8 && WIFI_PASSWORD.len() <= 64),
    "WATCHPOST_WIFI_PASSWORD: a WPA2 passphrase is 8 to 63 characters (or 64 hex digits); \
     leave it unset for an open network"
);

/// Number of entries in a comma-separated list (an empty list counts one, empty, entry).
pub const fn entries(list: &str) -> usize {
    let bytes = list.as_bytes();
    let (mut n, mut i) = (1, 0);
    while i < bytes.len() {
        if bytes[i] == b',' {
            n += 1;
        }
        i += 1;
    }
    n
}

/// Parses `N` comma-separated `IPv4:port` entries (spaces around an entry are allowed). Meant
/// for constant evaluation: a malformed entry panics, which there is a compile-time error.
pub const fn parse_gateways<const N: usize>(list: &str) -> [SocketAddrV4; N] {
    let bytes = list.as_bytes();
    let mut out = [SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); N];
    let (mut k, mut i) = (0, 0);
    while k < N {
        let (addr, next) = parse_entry(bytes, i);
        out[k] = addr;
        k += 1;
        i = next;
    }
    assert!(
        i >= bytes.len(),
        "WATCHPOST_GATEWAYS: more entries than counted"
    );
    out
}

const BAD_ENTRY: &str = "WATCHPOST_GATEWAYS: every entry must be IPv4:port, e.g. \
                         192.168.1.10:1883,192.168.1.11:1883 (no names, no empty entries)";

/// One entry from `i`; returns it and the index after its comma (or the end).
const fn parse_entry(bytes: &[u8], mut i: usize) -> (SocketAddrV4, usize) {
    i = skip_spaces(bytes, i);
    let mut octets = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        let (value, next) = number(bytes, i);
        assert!(
            value <= 255,
            "WATCHPOST_GATEWAYS: each part of an IPv4 address is 0 to 255"
        );
        octets[n] = value as u8;
        i = next;
        let separator = if n < 3 { b'.' } else { b':' };
        if i >= bytes.len() || bytes[i] != separator {
            panic!("{}", BAD_ENTRY);
        }
        i += 1;
        n += 1;
    }
    let (port, next) = number(bytes, i);
    assert!(
        port >= 1 && port <= 65_535,
        "WATCHPOST_GATEWAYS: a port is 1 to 65535"
    );
    i = skip_spaces(bytes, next);
    if i < bytes.len() && bytes[i] != b',' {
        panic!("{}", BAD_ENTRY);
    }
    let [a, b, c, d] = octets;
    (
        SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port as u16),
        i + 1,
    )
}

/// 1 to 5 decimal digits from `i`.
const fn number(bytes: &[u8], mut i: usize) -> (u32, usize) {
    let start = i;
    let mut value = 0u32;
    while i < bytes.len() && bytes[i].is_ascii_digit() && i - start < 5 {
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    if i == start || (i < bytes.len() && bytes[i].is_ascii_digit()) {
        panic!("{}", BAD_ENTRY);
    }
    (value, i)
}

const fn skip_spaces(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && bytes[i] == b' ' {
        i += 1;
    }
    i
}

// The parser's tests run in constant evaluation: this board builds only for its target, so a
// failing case here fails every build.
const _: () = {
    let one: [SocketAddrV4; 1] = parse_gateways("192.168.1.10:1883");
    assert!(matches!(one[0].ip().octets(), [192, 168, 1, 10]) && one[0].port() == 1883);

    const LIST: &str = "10.0.0.1:1883, 10.0.0.2:8883 ,255.255.255.254:65535";
    let three: [SocketAddrV4; entries(LIST)] = parse_gateways(LIST);
    assert!(matches!(three[0].ip().octets(), [10, 0, 0, 1]) && three[0].port() == 1883);
    assert!(matches!(three[1].ip().octets(), [10, 0, 0, 2]) && three[1].port() == 8883);
    assert!(matches!(three[2].ip().octets(), [255, 255, 255, 254]) && three[2].port() == 65535);

    assert!(entries("") == 1 && entries("a,b") == 2);
};
