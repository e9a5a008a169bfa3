//! A list of gateways: where the next connection goes.
//!
//! A site may run two gateways (they judge the same readings and both forward). A device that
//! knows both connects to the first; after a failed connect or a lost session it moves on to the
//! next, and so on around the list. It does not go back to the first on its own once it is
//! connected elsewhere (no preemption): every move costs a reconnect, and either gateway serves.
//!
//! The session's reconnect backoff still applies between attempts, so a device whose gateways
//! are all down does not hammer them; the ring keeps readings meanwhile and the gateway that
//! takes over receives them with their `seq`, so nothing handed over at QoS 1 is lost.
//!
//! A [`Link`](crate::mqtt::Link) that opens connections (a TCP socket) calls [`Gateways::next_address`]
//! in its `reopen`, which the session calls before every CONNECT: the first CONNECT goes to the
//! first address, and every later one follows a failure or a loss.

/// Addresses of type `A`, tried in turn. See the module documentation.
#[derive(Debug, Clone)]
pub struct Gateways<'a, A> {
    list: &'a [A],
    /// Index of the address in use, `None` before the first connection.
    current: Option<usize>,
    moves: u32,
}

impl<'a, A> Gateways<'a, A> {
    /// The list, to be tried in order from the first; `None` when it is empty.
    pub fn new(list: &'a [A]) -> Option<Self> {
        if list.is_empty() {
            return None;
        }
        Some(Self {
            list,
            current: None,
            moves: 0,
        })
    }

    /// The address for the next connection: the first on the first call, then the one after
    /// the last used, wrapping around. A list of one always gives that one.
    pub fn next_address(&mut self) -> &'a A {
        let index = match self.current {
            None => 0,
            Some(i) => {
                if self.list.len() > 1 {
                    self.moves = self.moves.saturating_add(1);
                }
                (i + 1) % self.list.len()
            }
        };
        self.current = Some(index);
        &self.list[index]
    }

    /// The address in use (the first before any connection), and its place in the list.
    pub fn current(&self) -> (usize, &'a A) {
        let index = self.current.unwrap_or(0);
        (index, &self.list[index])
    }

    /// How many times the device moved from one gateway to another.
    pub fn moves(&self) -> u32 {
        self.moves
    }

    /// The whole list.
    pub fn list(&self) -> &'a [A] {
        self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_first_and_moves_on_after_each_reconnect() {
        let list = ["a", "b", "c"];
        let mut g = Gateways::new(&list).unwrap();
        assert_eq!(g.current(), (0, &"a"));
        let tried: std::vec::Vec<&str> = (0..5).map(|_| *g.next_address()).collect();
        assert_eq!(tried, ["a", "b", "c", "a", "b"]);
        assert_eq!(g.current(), (1, &"b"));
        assert_eq!(g.moves(), 4);
    }

    #[test]
    fn a_single_gateway_is_always_the_one() {
        let list = [1883u16];
        let mut g = Gateways::new(&list).unwrap();
        assert_eq!(
            (*g.next_address(), *g.next_address(), *g.next_address()),
            (1883, 1883, 1883)
        );
        assert_eq!(g.moves(), 0);
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert!(Gateways::<u16>::new(&[]).is_none());
    }
}
