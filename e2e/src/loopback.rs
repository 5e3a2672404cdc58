//! Loopback address allocation. Every test gets its own random 127.X.Y.0/24 so
//! parallel tests can all use the real well-known ports (15008, 15001, ...)
//! without colliding: nodes are .1–.9, workloads .10 and up.

use std::net::{IpAddr, Ipv4Addr};

#[derive(Clone, Copy, Debug)]
pub struct Subnet {
    a: u8,
    b: u8,
}

impl Subnet {
    pub fn random() -> Self {
        Subnet {
            a: rand::random_range(100..=250),
            b: rand::random_range(1..=250),
        }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.a, self.b, host))
    }

    pub fn node(&self, n: u8) -> IpAddr {
        assert!((1..10).contains(&n), "node index 1..9");
        self.ip(n)
    }

    pub fn workload(&self, n: u8) -> IpAddr {
        self.ip(10 + n)
    }
}
