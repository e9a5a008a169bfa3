//! Keeps the Wi-Fi station associated: connect, wait for the link to drop, reconnect with
//! backoff. One log line per event.
//!
//! esp-radio offers connecting only as `async` functions. The board has no executor: its main
//! loop polls [`keep_connected`]'s future once per tick with [`poll_once`] (a no-op waker; the
//! loop comes back within a tick anyway), so the radio's waiting never blocks sampling or MQTT.
//! Not here: the IP side (DHCP, TCP), which follows the link in [`crate::net`].

use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use esp_println::println;
use esp_radio::wifi::WifiController;

use crate::net::now_ms;

/// Polls `future` once, without a waker: the caller polls again on its next tick.
pub fn poll_once<F: Future>(future: Pin<&mut F>) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match future.poll(&mut cx) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// Ready once the clock reaches `at_ms`.
struct Until {
    at_ms: u64,
}

impl Future for Until {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if now_ms() >= self.at_ms {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

fn sleep_ms(ms: u32) -> Until {
    Until {
        at_ms: now_ms() + u64::from(ms),
    }
}

/// Associates with the network the controller was configured for and re-associates whenever
/// the link drops, waiting `backoff_ms.0` after a failure, doubling up to `backoff_ms.1`, back
/// to the minimum after a success. `ssid` is only for the log; empty means none was set at
/// build time, which is logged as an error and retried (never a build failure).
pub async fn keep_connected(
    mut controller: WifiController<'_>,
    ssid: &str,
    backoff_ms: (u32, u32),
) -> ! {
    let (min, max) = backoff_ms;
    let mut delay = min;
    loop {
        if ssid.is_empty() {
            println!(
                "wifi: no network name: build with WATCHPOST_WIFI_SSID set \
                 (see watchpost.env.example); retry in {} ms",
                max
            );
            sleep_ms(max).await;
            continue;
        }
        println!("wifi connecting ssid={}", ssid);
        match controller.connect_async().await {
            Ok(info) => {
                println!(
                    "wifi connected ssid={} channel={} (waiting for DHCP)",
                    info.ssid.as_str(),
                    info.channel
                );
                delay = min;
                match controller.wait_for_disconnect_async().await {
                    Ok(info) => println!(
                        "wifi link lost (reason {:?}), reconnect in {} ms",
                        info.reason, delay
                    ),
                    Err(e) => println!("wifi link lost ({}), reconnect in {} ms", e, delay),
                }
            }
            Err(e) => println!(
                "wifi connect failed ({}), retry in {} ms; check WATCHPOST_WIFI_SSID and \
                 WATCHPOST_WIFI_PASSWORD",
                e, delay
            ),
        }
        sleep_ms(delay).await;
        delay = delay.saturating_mul(2).min(max);
    }
}
