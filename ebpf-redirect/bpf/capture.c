// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// Capture of enrolled pods' TCP into ztunnel's transparent listeners in the
// node's network namespace, keeping the original destination (the accepted
// socket's local address is what the client dialled).
//
// capture_outbound: tc ingress of the host-side veth of an enrolled pod; new
//   connections go to the outbound listener (15001).
// capture_inbound: tc ingress of the node's uplink; new connections to an
//   enrolled pod go to the HBONE listener (15008) if they target port 15008,
//   else to the inbound plaintext listener (15006), so policy cannot be skipped.
//   Also on tc ingress of a local waypoint pod's veth: its HBONE to an enrolled
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
// Every assigned packet carries CAPTURE_MARK, which the node routes to `local`.
//
// Maps and links are pinned (see the loader): they outlive ztunnel, so a
// stopped ztunnel leaves enrolled pods failing closed, and a restarted one
// picks the state up and swaps its program in atomically.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
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

struct capture_config {
	__u32 listener_ip;    // network order; 0 = the packet's destination (wildcard listeners)
	__u16 listener_port;  // outbound listener, network order; 0 = none: drop new connections
	__u16 hbone_port;     // network order; 0 = none
	__u16 plaintext_port; // network order; 0 = none
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
	STAT_DROPPED_IPV6 = 9,
	STAT_MAX = 10,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct capture_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} capture_config SEC(".maps");

// Addresses (network order) of the enrolled pods on this node.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled_pods SEC(".maps");

#define DIR_OUTBOUND 0
#define DIR_INBOUND 1

// Ports that bypass capture: per pod (its address) and direction; address 0
// applies to every pod of the node.
struct exclusion_key {
	__u32 pod_ip; // network order, 0 = any pod
	__u16 port;   // host order
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

static __always_inline int excluded(__u32 pod_ip, __u16 port, __u8 direction)
{
	struct exclusion_key k = {.pod_ip = pod_ip, .port = port, .direction = direction};
	if (bpf_map_lookup_elem(&excluded_ports, &k))
		return 1;
	k.pod_ip = 0;
	return bpf_map_lookup_elem(&excluded_ports, &k) != 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} capture_stats SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&capture_stats, &which);
	if (v)
		*v += 1;
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

// Assigns a SYN to the listener on `port` (network order), or drops it.
static __always_inline int to_listener(struct __sk_buff *skb, struct iphdr *ip, struct tcphdr *tcp,
				       __u32 listener_ip, __u16 port, __u32 stat)
{
	if (port == 0) {
		count(STAT_DROPPED_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	struct bpf_sock_tuple lt = {};
	lt.ipv4.saddr = ip->saddr;
	lt.ipv4.sport = tcp->source;
	lt.ipv4.daddr = listener_ip ? listener_ip : ip->daddr;
	lt.ipv4.dport = port;
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &lt, sizeof(lt.ipv4), BPF_F_CURRENT_NETNS, 0);
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

// Whether a node service listens on the packet's destination: the listener
// the kernel would pick when a SYN meets a TIME_WAIT socket. The probe tuple's
// source port 0 matches no connection, so only listeners can be found.
static __always_inline int node_listener(struct __sk_buff *skb, struct iphdr *ip, struct tcphdr *tcp)
{
	struct bpf_sock_tuple probe = {};
	probe.ipv4.saddr = ip->saddr;
	probe.ipv4.daddr = ip->daddr;
	probe.ipv4.dport = tcp->dest;
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &probe, sizeof(probe.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	int listening = sk->state == BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return listening;
}

// Both programs: `direction` is a constant after inlining, so each program is
// straight-line code for the verifier.
static __always_inline int capture(struct __sk_buff *skb, __u8 direction)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		// IPv6 is not captured yet. An enrolled pod's IPv6 TCP must not leave
		// the mesh uncaptured, so it is dropped; other IPv6 (neighbour
		// discovery) passes.
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if (direction == DIR_OUTBOUND && (void *)(ip6 + 1) <= end && ip6->nexthdr == IPPROTO_TCP) {
			count(STAT_DROPPED_IPV6);
			return TC_ACT_SHOT;
		}
		return PASS;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP)
		return PASS;
	// Outbound: the pod is the sender (the program sits on its veth).
	// Inbound: only traffic for enrolled pods; the node's own passes.
	__u32 pod = direction == DIR_OUTBOUND ? ip->saddr : ip->daddr;
	if (direction == DIR_INBOUND && !bpf_map_lookup_elem(&enrolled_pods, &pod))
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
	int syn = tcp->syn && !tcp->ack;

	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	tuple.ipv4.sport = tcp->source;
	tuple.ipv4.dport = tcp->dest;
	// Pitfall: skc (not sk) lookup, so a half-open connection finds its
	// request socket rather than the listener; TIME_WAIT sockets too.
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state == BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
		} else if (syn && sk->state == BPF_TCP_TIME_WAIT && node_listener(skb, ip, tcp)) {
			// A SYN on a TIME_WAIT socket is handed by the kernel to whatever
			// listens on the original destination: a node service here, which
			// must not receive pod traffic. Treat it as a new connection.
			bpf_sk_release(sk);
		} else {
			return assign(skb, sk, STAT_CAPTURED_ESTABLISHED);
		}
	}
	if (!syn) {
		count(STAT_PASSED);
		return PASS;
	}
	// Exclusions apply to new connections only, never to packets of a
	// connection ztunnel owns. An outbound exclusion never opens a way
	// around an enrolled destination's own capture.
	int enrolled_dst = direction == DIR_OUTBOUND && bpf_map_lookup_elem(&enrolled_pods, &ip->daddr);
	if (!enrolled_dst && excluded(pod, bpf_ntohs(tcp->dest), direction)) {
		count(STAT_EXCLUDED);
		return PASS;
	}

	__u32 zero = 0;
	struct capture_config *cfg = bpf_map_lookup_elem(&capture_config, &zero);
	if (!cfg) {
		count(STAT_DROPPED_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	if (direction == DIR_OUTBOUND)
		return to_listener(skb, ip, tcp, cfg->listener_ip, cfg->listener_port, STAT_CAPTURED_NEW);
	if (cfg->hbone_port && tcp->dest == cfg->hbone_port)
		return to_listener(skb, ip, tcp, cfg->listener_ip, cfg->hbone_port, STAT_INBOUND_HBONE);
	return to_listener(skb, ip, tcp, cfg->listener_ip, cfg->plaintext_port, STAT_INBOUND_PLAINTEXT);
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

char _license[] SEC("license") = "Dual BSD/GPL";
