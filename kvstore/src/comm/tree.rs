//! Topology-aware reduction trees, the idea of MXNet's CommDeviceTree: sum
//! the values of several devices along a binary tree whose upper edges use
//! the fastest links, so that the most data crosses the best links.
//!
//! A tree over devices `D` rooted at `r` is built by recursive bisection of
//! the link graph: split `D` into halves `A ∋ r` and `B` that cut as little
//! link weight as possible (greedy growth from `r`, then Kernighan–Lin
//! swaps), connect `B`'s best-linked device to `r`, and recurse on both
//! halves. Every choice breaks ties by the lower device index, so the tree
//! (and with it the order of every sum) is a function of the topology and
//! the root alone.

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::error::{KvError, Result};

/// Link weights between devices (higher: faster), symmetric.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    n: usize,
    w: Vec<f64>,
}

impl Topology {
    /// `n` devices, every pair linked alike.
    pub fn uniform(n: usize) -> Topology {
        let mut w = vec![1.0; n * n];
        for i in 0..n {
            w[i * n + i] = 0.0;
        }
        Topology { n, w }
    }

    /// From a square matrix of link weights (must be symmetric, finite,
    /// non-negative).
    pub fn from_matrix(rows: &[Vec<f64>]) -> Result<Topology> {
        let n = rows.len();
        let mut w = vec![0.0; n * n];
        for (i, r) in rows.iter().enumerate() {
            if r.len() != n {
                return Err(KvError::invalid(format!(
                    "topology row {i} has {} weights, expected {n}",
                    r.len()
                )));
            }
            for (j, &x) in r.iter().enumerate() {
                if !(x.is_finite() && x >= 0.0) {
                    return Err(KvError::invalid(format!(
                        "topology weight ({i},{j}) = {x} must be finite and >= 0"
                    )));
                }
                w[i * n + j] = x;
            }
        }
        for i in 0..n {
            for j in 0..i {
                if w[i * n + j] != w[j * n + i] {
                    return Err(KvError::invalid(format!(
                        "topology weights ({i},{j}) and ({j},{i}) differ: links are symmetric"
                    )));
                }
            }
        }
        Ok(Topology { n, w })
    }

    /// Parses `PSKV_KVSTORE_TOPOLOGY`: rows separated by `;`, weights by
    /// spaces or commas, e.g. `0 3 1 1; 3 0 1 1; 1 1 0 3; 1 1 3 0`.
    pub fn parse(text: &str) -> Result<Topology> {
        let rows = text
            .split(';')
            .filter(|r| !r.trim().is_empty())
            .map(|r| {
                r.split([' ', ','])
                    .filter(|x| !x.is_empty())
                    .map(|x| {
                        x.parse::<f64>().map_err(|_| {
                            KvError::invalid(format!("topology weight '{x}' is not a number"))
                        })
                    })
                    .collect::<Result<Vec<f64>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Topology::from_matrix(&rows)
    }

    /// Devices described.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether it describes no device.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The weight of the link between `a` and `b`.
    pub fn weight(&self, a: usize, b: usize) -> f64 {
        self.w[a * self.n + b]
    }

    /// The reduction tree over `devices` (indices into this topology),
    /// rooted at `root` (one of them).
    pub fn tree(&self, devices: &[usize], root: usize) -> Result<ReduceTree> {
        if let Some(&d) = devices.iter().find(|&&d| d >= self.n) {
            return Err(KvError::invalid(format!(
                "device {d} is outside the topology of {} devices",
                self.n
            )));
        }
        let mut set: Vec<usize> = devices.to_vec();
        set.sort_unstable();
        set.dedup();
        if set.len() != devices.len() {
            return Err(KvError::invalid("a reduction tree needs distinct devices"));
        }
        if !set.contains(&root) {
            return Err(KvError::invalid(format!(
                "the root {root} is not among the devices {devices:?}"
            )));
        }
        let mut g = DiGraph::new();
        let nodes: Vec<NodeIndex> = set.iter().map(|&d| g.add_node(d)).collect();
        let node_of = |d: usize| nodes[set.binary_search(&d).expect("a member")];
        let mut edges = Vec::new();
        self.split(set.clone(), root, 0, &mut edges);
        for (child, parent, level) in edges {
            g.add_edge(node_of(child), node_of(parent), level);
        }
        Ok(ReduceTree {
            root: node_of(root),
            graph: g,
        })
    }

    fn cut(&self, a: &[usize], b: &[usize]) -> f64 {
        a.iter()
            .flat_map(|&x| b.iter().map(move |&y| (x, y)))
            .map(|(x, y)| self.weight(x, y))
            .sum()
    }

    fn split(
        &self,
        set: Vec<usize>,
        root: usize,
        level: u32,
        edges: &mut Vec<(usize, usize, u32)>,
    ) {
        if set.len() <= 1 {
            return;
        }
        let half = set.len().div_ceil(2);
        // Grow A from the root by the strongest total link.
        let mut a = vec![root];
        let mut b: Vec<usize> = set.iter().copied().filter(|&d| d != root).collect();
        while a.len() < half {
            let (i, _) = b
                .iter()
                .enumerate()
                .map(|(i, &d)| (i, a.iter().map(|&x| self.weight(x, d)).sum::<f64>()))
                .fold((0, f64::NEG_INFINITY), |best, cur| {
                    if cur.1 > best.1 {
                        cur
                    } else {
                        best
                    }
                });
            a.push(b.remove(i));
        }
        // Kernighan–Lin: swap pairs while a swap lowers the cut.
        let mut cut = self.cut(&a, &b);
        for _ in 0..set.len() * set.len() {
            let mut best: Option<(usize, usize, f64)> = None;
            for i in 1..a.len() {
                for j in 0..b.len() {
                    let (mut a2, mut b2) = (a.clone(), b.clone());
                    std::mem::swap(&mut a2[i], &mut b2[j]);
                    let c = self.cut(&a2, &b2);
                    if c < cut - 1e-12 && best.is_none_or(|(_, _, bc)| c < bc) {
                        best = Some((i, j, c));
                    }
                }
            }
            match best {
                Some((i, j, c)) => {
                    std::mem::swap(&mut a[i], &mut b[j]);
                    cut = c;
                }
                None => break,
            }
        }
        b.sort_unstable();
        a[1..].sort_unstable();
        // B's root: the device best linked to the root.
        let b_root = b
            .iter()
            .copied()
            .fold((usize::MAX, f64::NEG_INFINITY), |best, d| {
                let w = self.weight(root, d);
                if w > best.1 {
                    (d, w)
                } else {
                    best
                }
            })
            .0;
        edges.push((b_root, root, level));
        self.split(a, root, level + 1, edges);
        self.split(b, b_root, level + 1, edges);
    }
}

/// A reduction tree: edges point from child to parent, weighted by level
/// (0: the last, top-most merge).
#[derive(Clone, Debug)]
pub struct ReduceTree {
    root: NodeIndex,
    graph: DiGraph<usize, u32>,
}

impl ReduceTree {
    /// The root device.
    pub fn root(&self) -> usize {
        self.graph[self.root]
    }

    /// The children of `device`, in the order their partial sums are
    /// added (deepest level first).
    pub fn children(&self, device: usize) -> Vec<usize> {
        let Some(n) = self.graph.node_indices().find(|&n| self.graph[n] == device) else {
            return Vec::new();
        };
        let mut c: Vec<(u32, usize)> = self
            .graph
            .edges_directed(n, Direction::Incoming)
            .map(|e| (*e.weight(), self.graph[e.source()]))
            .collect();
        c.sort_unstable_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
        c.into_iter().map(|(_, d)| d).collect()
    }

    /// The devices in an order where every child comes before its parent
    /// (the order the partial sums are formed).
    pub fn post_order(&self) -> Vec<usize> {
        let mut out = Vec::new();
        self.visit(self.root(), &mut out);
        out
    }

    fn visit(&self, d: usize, out: &mut Vec<usize>) {
        for c in self.children(d) {
            self.visit(c, out);
        }
        out.push(d);
    }

    /// The parent of `device` (None for the root).
    pub fn parent(&self, device: usize) -> Option<usize> {
        let n = self
            .graph
            .node_indices()
            .find(|&n| self.graph[n] == device)?;
        self.graph
            .edges_directed(n, Direction::Outgoing)
            .next()
            .map(|e| self.graph[e.target()])
    }

    /// The link weight summed over the tree's edges.
    pub fn link_weight(&self, topo: &Topology) -> f64 {
        self.graph
            .edge_references()
            .map(|e| topo.weight(self.graph[e.source()], self.graph[e.target()]))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two NVLink pairs (0,1) and (2,3), PCIe between them.
    fn pairs() -> Topology {
        Topology::parse("0 3 1 1; 3 0 1 1; 1 1 0 3; 1 1 3 0").unwrap()
    }

    #[test]
    fn the_tree_keeps_fast_links_inside_halves() {
        let t = pairs().tree(&[0, 1, 2, 3], 0).unwrap();
        assert_eq!(t.root(), 0);
        assert_eq!(t.parent(1), Some(0));
        assert_eq!(t.parent(3), Some(2));
        assert_eq!(t.parent(2), Some(0));
        // The pair partner (deeper level) is added before the other half.
        assert_eq!(t.children(0), vec![1, 2]);
        assert_eq!(t.post_order(), vec![1, 3, 2, 0]);
        assert_eq!(t.link_weight(&pairs()), 7.0);
    }

    #[test]
    fn every_device_is_reached_once_for_any_root_and_size() {
        for n in 1..9 {
            let topo = Topology::uniform(n);
            let devs: Vec<usize> = (0..n).collect();
            for root in 0..n {
                let t = topo.tree(&devs, root).unwrap();
                let mut order = t.post_order();
                assert_eq!(*order.last().unwrap(), root);
                order.sort_unstable();
                assert_eq!(order, devs);
                let depth = |mut d: usize| {
                    let mut k = 0;
                    while let Some(p) = t.parent(d) {
                        d = p;
                        k += 1;
                    }
                    k
                };
                let max = devs.iter().map(|&d| depth(d)).max().unwrap();
                assert!(max <= n.next_power_of_two().trailing_zeros() as usize);
            }
        }
    }

    #[test]
    fn bad_topologies_are_refused() {
        assert!(Topology::parse("0 1; 2 0").is_err());
        assert!(Topology::parse("0 1 1; 1 0").is_err());
        assert!(Topology::parse("0 x; 1 0").is_err());
        assert!(pairs().tree(&[0, 1], 2).is_err());
        assert!(pairs().tree(&[0, 0], 0).is_err());
        assert!(pairs().tree(&[0, 9], 0).is_err());
    }
}
