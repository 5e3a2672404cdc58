// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// Capture of enrolled pods' TCP (IPv4 and IPv6) into ztunnel's transparent
// listeners in the node's network namespace, keeping the original destination
// (the accepted socket's local address is what the client dialled).
//
// capture_outbound: tc ingress of the host-side veth of an enrolled pod; new
//   connections go to the outbound listener (15001).
// capture_inbound: tc ingress of the node's uplink; new connections to an
//   enrolled pod go to the HBONE listener (15008) if they target port 15008,
//   else to the inbound plaintext listener (15006), so policy cannot be skipped.
//   Also on tc ingress of the veths of local pods that are not captured
//   themselves (waypoints, pods outside the mesh): their traffic to an enrolled
//   pod on the same node never crosses the uplink, and bpf_sk_assign works only
//   at ingress, so it is taken where it enters the node.
//
//  1. A packet of a connection some node socket already owns (established,
//     SYN_SENT, request socket, TIME_WAIT) goes to that socket.
//  2. A pure SYN goes to the listener; if there is none (ztunnel down) it is
//     dropped: enrolled pods fail closed.
//  3. Everything else (non-TCP, excluded ports, connections older than the
//     attachment) passes untouched.
//
// hand_over_time_wait (sk_lookup, the node's network namespace): a SYN that
//   reuses the tuple of a connection ztunnel closed first meets ztunnel's
//   TIME_WAIT socket. It must go to that socket (given to a listener while the
//   TIME_WAIT socket exists, it is dropped as a duplicate), and the kernel
//   then retires the TIME_WAIT socket only if a listener lookup on the
//   original destination finds one; none listens there, so without this
//   program the client gets an ACK, resets and retries its SYN later (a stall
//   of ~10 ms to 1 s per reuse, hundreds a second under load). Step 1 records
//   such a SYN with the listener it would have gone to; the lookup answers
//   with that listener, and the kernel hands the SYN over as it would to a
//   local service.
//
// Every captured packet carries CAPTURE_MARK, which the node routes to `local`
// (one rule and route per family).
//
// Maps and links are pinned (see the loader): they outlive ztunnel, so a
// stopped ztunnel leaves enrolled pods failing closed, and a restarted one
// picks the state up and swaps its program in atomically. IPv6 has maps of its
// own rather than wider keys in the IPv4 ones: a pinned map is reused by name
// without a layout check, so an upgraded ztunnel must find the old maps as
// they were.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define CAPTURE_MARK 0x539

// tcx: hand the packet on to the next program (or the default action), so a
// CNI's own programs still see what we do not capture.
#define PASS TC_ACT_UNSPEC

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

// IPv6 extension headers walked to find the upper-layer protocol. Longer
// chains are not looked through (an enrolled pod's such packet is dropped).
#define MAX_EXT_HEADERS 8
#define IP6_FRAG_OFFSET 0xfff8

struct capture_config {
	__u32 listener_ip;    // network order; 0 = the packet's destination (wildcard listeners)
	__u16 listener_port;  // outbound listener, network order; 0 = none: drop new connections
	__u16 hbone_port;     // network order; 0 = none
	__u16 plaintext_port; // network order; 0 = none
	__u16 pad;
};

// The outbound listener for IPv6 connections (HBONE and plaintext ports are
// capture_config's).
struct capture_config6 {
	__u32 listener_ip[4]; // network order; all zero = the packet's destination
	__u16 listener_port;  // network order; 0 = none: drop new IPv6 connections
	__u16 pad;
};

enum stat {
	STAT_CAPTURED_NEW = 0,
	STAT_CAPTURED_ESTABLISHED = 1,
	STAT_PASSED = 2,
	STAT_EXCLUDED = 3,
	STAT_DROPPED_NO_LISTENER = 4,
	STAT_DROPPED_ASSIGN_FAILED = 5,
	STAT_INBOUND_HBONE = 6,
	STAT_INBOUND_PLAINTEXT = 7,
	STAT_DROPPED_MALFORMED = 8,
	// An enrolled pod's IPv6 TCP behind extension headers (not captured).
	STAT_DROPPED_IPV6 = 9,
	STAT_MAX = 10,
};

// hand_over_time_wait's counters. A map of their own: capture_stats is pinned
// and reused by an upgraded ztunnel as it is, so it cannot grow.
enum handoff_stat {
	HANDOFF_TAKEN = 0,
	HANDOFF_NO_LISTENER = 1,
	HANDOFF_STAT_MAX = 2,
};

// ztunnel's listeners, by the slot a recorded SYN names (filled by the
// loader; a closed socket leaves its slot by itself). Not pinned: they are
// this process's sockets.
enum listener_slot {
	SLOT_OUTBOUND = 0,
	SLOT_HBONE = 1,
	SLOT_PLAINTEXT = 2,
	SLOT_MAX = 3,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct capture_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} capture_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct capture_config6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} capture_config6 SEC(".maps");

// Addresses (network order) of the enrolled pods on this node.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct in6_addr);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled_pods6 SEC(".maps");

#define DIR_OUTBOUND 0
#define DIR_INBOUND 1

// Ports that bypass capture: per pod (its address) and direction; address 0
// (:: for IPv6) applies to every pod of the node.
struct exclusion_key {
	__u32 pod_ip; // network order, 0 = any pod
	__u16 port;   // host order
	__u8 direction;
	__u8 pad;
};

struct exclusion_key6 {
	__u32 pod_ip[4]; // network order, :: = any pod
	__u16 port;      // host order
	__u8 direction;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct exclusion_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} excluded_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct exclusion_key6);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} excluded_ports6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} capture_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HANDOFF_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} handoff_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, SLOT_MAX);
	__type(key, __u32);
	__type(value, __u32); // a socket descriptor, as the loader writes it
} handoff_listeners SEC(".maps");

// A connection's tuple as the listener lookup sees it: `remote` is the
// client, `local` the original destination. IPv4 addresses in word 0.
struct handoff_key {
	__u32 remote[4];   // network order
	__u32 local[4];    // network order
	__u16 remote_port; // network order
	__u16 local_port;  // host order
	__u32 family;      // AF_INET or AF_INET6
};

// SYNs that met ztunnel's TIME_WAIT socket, recorded by step 1 with the slot
// of the listener they go to; taken out by hand_over_time_wait. An entry the
// kernel never asks for (the SYN was refused as too old) ages out.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct handoff_key);
	__type(value, __u32);
} time_wait_handoff SEC(".maps");

static __always_inline void count_in(void *map, __u32 which)
{
	__u64 *v = bpf_map_lookup_elem(map, &which);
	if (v)
		*v += 1;
}

static __always_inline void count(__u32 which)
{
	count_in(&capture_stats, which);
}

// `v6` is a constant at every call site, so after inlining each family is
// straight-line code for the verifier.
static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, struct bpf_sock_tuple *t, int v6)
{
	return bpf_skc_lookup_tcp(skb, t, v6 ? sizeof(t->ipv6) : sizeof(t->ipv4), BPF_F_CURRENT_NETNS, 0);
}

static __always_inline int is_enrolled(struct bpf_sock_tuple *t, int v6, int dst)
{
	if (v6)
		return bpf_map_lookup_elem(&enrolled_pods6, dst ? t->ipv6.daddr : t->ipv6.saddr) != 0;
	return bpf_map_lookup_elem(&enrolled_pods, dst ? &t->ipv4.daddr : &t->ipv4.saddr) != 0;
}

// Whether `port` is excluded for the pod (the source outbound, the
// destination inbound) or for every pod.
static __always_inline int excluded(struct bpf_sock_tuple *t, int v6, __u16 port, __u8 direction)
{
	if (v6) {
		struct exclusion_key6 k = {.port = port, .direction = direction};
		__builtin_memcpy(k.pod_ip, direction == DIR_OUTBOUND ? t->ipv6.saddr : t->ipv6.daddr,
				 sizeof(k.pod_ip));
		if (bpf_map_lookup_elem(&excluded_ports6, &k))
			return 1;
		__builtin_memset(k.pod_ip, 0, sizeof(k.pod_ip));
		return bpf_map_lookup_elem(&excluded_ports6, &k) != 0;
	}
	struct exclusion_key k = {.port = port, .direction = direction};
	k.pod_ip = direction == DIR_OUTBOUND ? t->ipv4.saddr : t->ipv4.daddr;
	if (bpf_map_lookup_elem(&excluded_ports, &k))
		return 1;
	k.pod_ip = 0;
	return bpf_map_lookup_elem(&excluded_ports, &k) != 0;
}

// A packet of a connection a node socket owns: the kernel's own lookup finds
// that socket by the packet's tuple, as ours did, so only the route needs
// changing. No bpf_sk_assign: an unassigned packet takes the stack's early
// demux, which for an established socket reuses the socket's cached input
// route and skips the routing lookup the mark would otherwise cost; the same
// path iptables' `-m socket -j MARK` takes.
static __always_inline int to_owner(struct bpf_sock *sk, struct __sk_buff *skb, __u32 stat)
{
	bpf_sk_release(sk);
	skb->mark = CAPTURE_MARK;
	count(stat);
	return TC_ACT_OK;
}

static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk, __u32 stat)
{
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		count(STAT_DROPPED_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	// Pitfall: every assigned packet needs the mark, not only the SYN.
	skb->mark = CAPTURE_MARK;
	count(stat);
	return TC_ACT_OK;
}

// Assigns a SYN to the listener on `port` (network order) at `ip4` / `ip6`
// (zero or NULL: the packet's destination), or drops it.
static __always_inline int to_listener(struct __sk_buff *skb, struct bpf_sock_tuple *t, int v6, __u32 ip4,
				       const __u32 *ip6, __u16 port, __u32 stat)
{
	if (port == 0) {
		count(STAT_DROPPED_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	struct bpf_sock_tuple lt = *t;
	if (v6) {
		if (ip6 && (ip6[0] | ip6[1] | ip6[2] | ip6[3]))
			__builtin_memcpy(lt.ipv6.daddr, ip6, sizeof(lt.ipv6.daddr));
		lt.ipv6.dport = port;
	} else {
		if (ip4)
			lt.ipv4.daddr = ip4;
		lt.ipv4.dport = port;
	}
	struct bpf_sock *sk = lookup(skb, &lt, v6);
	if (!sk) {
		count(STAT_DROPPED_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		count(STAT_DROPPED_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	return assign(skb, sk, stat);
}

#define AF_INET 2
#define AF_INET6 10

// A SYN meeting ztunnel's TIME_WAIT socket: record which listener takes it
// over (see hand_over_time_wait) and deliver it to the TIME_WAIT socket.
static __always_inline int to_time_wait(struct __sk_buff *skb, struct bpf_sock_tuple *t, int v6, __u16 port,
					__u32 slot, __u32 stat)
{
	if (port == 0) {
		count(STAT_DROPPED_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	struct handoff_key k = {};
	if (v6) {
		__builtin_memcpy(k.remote, t->ipv6.saddr, sizeof(k.remote));
		__builtin_memcpy(k.local, t->ipv6.daddr, sizeof(k.local));
		k.remote_port = t->ipv6.sport;
		k.local_port = bpf_ntohs(t->ipv6.dport);
		k.family = AF_INET6;
	} else {
		k.remote[0] = t->ipv4.saddr;
		k.local[0] = t->ipv4.daddr;
		k.remote_port = t->ipv4.sport;
		k.local_port = bpf_ntohs(t->ipv4.dport);
		k.family = AF_INET;
	}
	bpf_map_update_elem(&time_wait_handoff, &k, &slot, BPF_ANY);
	// Delivered locally, the stack's lookup finds the TIME_WAIT socket (or,
	// had it just expired, asks for a listener: the recorded tuple answers).
	skb->mark = CAPTURE_MARK;
	count(stat);
	return TC_ACT_OK;
}

// An enrolled pod's TCP packet, whose tuple is `t`: steps 1-3 above.
static __always_inline int capture_tcp(struct __sk_buff *skb, struct bpf_sock_tuple *t, int v6, int syn,
				       __u8 direction)
{
	// Pitfall: skc (not sk) lookup, so a half-open connection finds its
	// request socket rather than the listener; TIME_WAIT sockets too.
	struct bpf_sock *sk = lookup(skb, t, v6);
	int time_wait = 0;
	if (sk) {
		if (sk->state == BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
		} else if (syn && sk->state == BPF_TCP_TIME_WAIT) {
			// A new connection on an old tuple: decided like any other
			// below, then handed over through the TIME_WAIT socket.
			bpf_sk_release(sk);
			time_wait = 1;
		} else {
			return to_owner(sk, skb, STAT_CAPTURED_ESTABLISHED);
		}
	}
	if (!syn) {
		count(STAT_PASSED);
		return PASS;
	}
	__u16 dport = v6 ? t->ipv6.dport : t->ipv4.dport;
	// Exclusions apply to new connections only, never to packets of a
	// connection ztunnel owns. An outbound exclusion never opens a way
	// around an enrolled destination's own capture.
	int enrolled_dst = direction == DIR_OUTBOUND && is_enrolled(t, v6, 1);
	if (!enrolled_dst && excluded(t, v6, bpf_ntohs(dport), direction)) {
		count(STAT_EXCLUDED);
		return PASS;
	}

	__u32 zero = 0;
	struct capture_config *cfg = bpf_map_lookup_elem(&capture_config, &zero);
	if (!cfg) {
		count(STAT_DROPPED_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	const __u32 *ip6 = 0;
	__u16 outbound_port = cfg->listener_port;
	if (v6) {
		struct capture_config6 *cfg6 = bpf_map_lookup_elem(&capture_config6, &zero);
		if (!cfg6) {
			count(STAT_DROPPED_NO_LISTENER);
			return TC_ACT_SHOT;
		}
		ip6 = cfg6->listener_ip;
		outbound_port = cfg6->listener_port;
	}
	if (direction == DIR_OUTBOUND) {
		if (time_wait)
			return to_time_wait(skb, t, v6, outbound_port, SLOT_OUTBOUND, STAT_CAPTURED_NEW);
		return to_listener(skb, t, v6, cfg->listener_ip, ip6, outbound_port, STAT_CAPTURED_NEW);
	}
	if (cfg->hbone_port && dport == cfg->hbone_port) {
		if (time_wait)
			return to_time_wait(skb, t, v6, cfg->hbone_port, SLOT_HBONE, STAT_INBOUND_HBONE);
		return to_listener(skb, t, v6, 0, 0, cfg->hbone_port, STAT_INBOUND_HBONE);
	}
	if (time_wait)
		return to_time_wait(skb, t, v6, cfg->plaintext_port, SLOT_PLAINTEXT, STAT_INBOUND_PLAINTEXT);
	return to_listener(skb, t, v6, 0, 0, cfg->plaintext_port, STAT_INBOUND_PLAINTEXT);
}

static __always_inline int capture4(struct __sk_buff *skb, __u8 direction)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP)
		return PASS;
	struct bpf_sock_tuple t = {};
	t.ipv4.saddr = ip->saddr;
	t.ipv4.daddr = ip->daddr;
	// Outbound: the pod is the sender (the program sits on its veth).
	// Inbound: only traffic for enrolled pods; the node's own passes.
	if (direction == DIR_INBOUND && !is_enrolled(&t, 0, 1))
		return PASS;

	// From here on this is an enrolled pod's TCP: what cannot be inspected is
	// dropped, never passed (a fragment or a split header would otherwise
	// slip a SYN past capture).
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) {
		count(STAT_DROPPED_MALFORMED);
		return TC_ACT_SHOT;
	}
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip) || ihl > 60) {
		count(STAT_DROPPED_MALFORMED);
		return TC_ACT_SHOT;
	}
	if ((void *)ip + ihl + sizeof(struct tcphdr) > end) {
		if (bpf_skb_pull_data(skb, sizeof(struct ethhdr) + ihl + sizeof(struct tcphdr))) {
			count(STAT_DROPPED_MALFORMED);
			return TC_ACT_SHOT;
		}
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		ip = data + sizeof(struct ethhdr);
		if ((void *)(ip + 1) > end) {
			count(STAT_DROPPED_MALFORMED);
			return TC_ACT_SHOT;
		}
	}
	struct tcphdr *tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > end) {
		count(STAT_DROPPED_MALFORMED);
		return TC_ACT_SHOT;
	}
	t.ipv4.sport = tcp->source;
	t.ipv4.dport = tcp->dest;
	return capture_tcp(skb, &t, 0, tcp->syn && !tcp->ack, direction);
}

// The upper-layer protocol behind the IPv6 extension headers starting at
// `off` with type `nexthdr`; -1 when it cannot be told (a chain too long or
// unreadable, a later fragment whose first header is another extension).
static __always_inline int ipv6_upper_protocol(struct __sk_buff *skb, __u32 off, __u8 nexthdr)
{
#pragma unroll
	for (int i = 0; i < MAX_EXT_HEADERS; i++) {
		__u8 hdr[4];
		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
		case IPPROTO_MH:
		case 139: // HIP
		case 140: // Shim6
		case 253: // experimental (RFC 3692)
		case 254:
			if (bpf_skb_load_bytes(skb, off, hdr, 2))
				return -1;
			nexthdr = hdr[0];
			off += ((__u32)hdr[1] + 1) * 8;
			break;
		case IPPROTO_AH:
			if (bpf_skb_load_bytes(skb, off, hdr, 2))
				return -1;
			nexthdr = hdr[0];
			off += ((__u32)hdr[1] + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			if (bpf_skb_load_bytes(skb, off, hdr, 4))
				return -1;
			nexthdr = hdr[0];
			// A later fragment carries no headers after this one: its own
			// next header is all there is to go by.
			if (((__u16)hdr[2] << 8 | hdr[3]) & IP6_FRAG_OFFSET) {
				if (nexthdr == IPPROTO_TCP)
					return IPPROTO_TCP;
				return nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS ||
					       nexthdr == IPPROTO_AH ? -1 : nexthdr;
			}
			off += 8;
			break;
		default:
			return nexthdr;
		}
	}
	return -1;
}

static __always_inline int capture6(struct __sk_buff *skb, __u8 direction)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	if ((void *)(ip6 + 1) > end)
		return PASS;
	struct bpf_sock_tuple t = {};
	__builtin_memcpy(t.ipv6.saddr, &ip6->saddr, sizeof(t.ipv6.saddr));
	__builtin_memcpy(t.ipv6.daddr, &ip6->daddr, sizeof(t.ipv6.daddr));
	if (direction == DIR_INBOUND && !is_enrolled(&t, 1, 1))
		return PASS;
	__u8 nexthdr = ip6->nexthdr;
	if (nexthdr != IPPROTO_TCP) {
		// Neighbour discovery, MLD (behind a hop-by-hop header), UDP... pass.
		// TCP behind extension headers (a fragment, a routing header that
		// changes the destination) is not captured: an enrolled pod's is
		// dropped, never passed, and so is what cannot be told apart from it.
		int upper = ipv6_upper_protocol(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr), nexthdr);
		if (upper == IPPROTO_TCP || upper < 0) {
			count(STAT_DROPPED_IPV6);
			return TC_ACT_SHOT;
		}
		return PASS;
	}
	struct tcphdr *tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > end) {
		if (bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct tcphdr))) {
			count(STAT_DROPPED_MALFORMED);
			return TC_ACT_SHOT;
		}
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		tcp = data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
		if ((void *)(tcp + 1) > end) {
			count(STAT_DROPPED_MALFORMED);
			return TC_ACT_SHOT;
		}
	}
	t.ipv6.sport = tcp->source;
	t.ipv6.dport = tcp->dest;
	return capture_tcp(skb, &t, 1, tcp->syn && !tcp->ack, direction);
}

// Both programs: `direction` is a constant after inlining.
static __always_inline int capture(struct __sk_buff *skb, __u8 direction)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return capture4(skb, direction);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return capture6(skb, direction);
	return PASS;
}

SEC("classifier")
int capture_inbound(struct __sk_buff *skb)
{
	return capture(skb, DIR_INBOUND);
}

SEC("classifier")
int capture_outbound(struct __sk_buff *skb)
{
	return capture(skb, DIR_OUTBOUND);
}

// The kernel asks for a listener on the original destination when a SYN
// meets a TIME_WAIT socket; answer with ztunnel's for the SYNs step 1
// recorded. Every other lookup (node services, ztunnel's own traffic) is
// left to the kernel.
SEC("sk_lookup")
int hand_over_time_wait(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	struct handoff_key k = {};
	if (ctx->family == AF_INET) {
		k.remote[0] = ctx->remote_ip4;
		k.local[0] = ctx->local_ip4;
	} else if (ctx->family == AF_INET6) {
		__builtin_memcpy(k.remote, ctx->remote_ip6, sizeof(k.remote));
		__builtin_memcpy(k.local, ctx->local_ip6, sizeof(k.local));
	} else {
		return SK_PASS;
	}
	k.family = ctx->family;
	k.remote_port = ctx->remote_port;
	k.local_port = ctx->local_port;
	__u32 *recorded = bpf_map_lookup_elem(&time_wait_handoff, &k);
	if (!recorded)
		return SK_PASS;
	__u32 slot = *recorded;
	bpf_map_delete_elem(&time_wait_handoff, &k);
	// A captured SYN never falls through to a node service: with ztunnel's
	// listener gone it is refused (the TIME_WAIT socket answers it).
	struct bpf_sock *sk = bpf_map_lookup_elem(&handoff_listeners, &slot);
	if (!sk) {
		count_in(&handoff_stats, HANDOFF_NO_LISTENER);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		count_in(&handoff_stats, HANDOFF_NO_LISTENER);
		return SK_DROP;
	}
	count_in(&handoff_stats, HANDOFF_TAKEN);
	return SK_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
