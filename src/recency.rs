//! Least-recently-seen order over MNs, for per-MN state that must stay bounded.
//!
//! The alarm engine and the downlink state keep something per device. For
//! devices the operator registered that is bounded by the configuration; for
//! MNs nobody registered it is bounded by nothing but what a sender invents,
//! one frame per MN being enough. Both keep their unregistered MNs in a
//! [`Recency`] and, past their cap, drop the one heard from longest ago: a
//! flood of invented MNs then churns through the cap instead of growing it,
//! and a real unregistered device that keeps sending stays near the front.
//!
//! Every operation is O(1) (a hash lookup and a few index updates), so a flood
//! at the cap costs the same per frame as traffic below it, and touching a
//! tracked MN, which every frame of an unregistered device does twice (the
//! detector and the downlink state), allocates nothing.

use std::collections::HashMap;

/// No node: the end of the list.
const NIL: usize = usize::MAX;

/// MNs in the order they were last touched: a doubly linked list threaded
/// through a slab of nodes, oldest at `head`, with an index from MN to node.
#[derive(Debug)]
pub struct Recency {
    index: HashMap<String, usize>,
    nodes: Vec<Node>,
    /// Slots of `nodes` given back by [`Recency::remove`] and
    /// [`Recency::pop_oldest`], reused before the slab grows: it never holds
    /// more nodes than MNs were tracked at once.
    free: Vec<usize>,
    head: usize,
    tail: usize,
}

#[derive(Debug)]
struct Node {
    /// Empty in a free slot.
    mn: String,
    prev: usize,
    next: usize,
}

impl Default for Recency {
    fn default() -> Self {
        Recency {
            index: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }
}

impl Recency {
    /// Marks `mn` as just seen; true when it was not tracked before.
    pub fn touch(&mut self, mn: &str) -> bool {
        if self.refresh(mn) {
            return false;
        }
        let node = Node {
            mn: mn.to_owned(),
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.push_back(i);
        self.index.insert(mn.to_owned(), i);
        true
    }

    /// Marks `mn` as just seen if it is tracked (one lookup, where `contains`
    /// and then `touch` are two); true when it was.
    pub fn refresh(&mut self, mn: &str) -> bool {
        match self.index.get(mn) {
            Some(&i) => {
                self.unlink(i);
                self.push_back(i);
                true
            }
            None => false,
        }
    }

    /// Stops tracking `mn` (it became registered); true when it was tracked.
    pub fn remove(&mut self, mn: &str) -> bool {
        match self.index.remove(mn) {
            Some(i) => {
                self.release(i);
                true
            }
            None => false,
        }
    }

    /// Removes and returns the MN touched longest ago.
    pub fn pop_oldest(&mut self) -> Option<String> {
        if self.head == NIL {
            return None;
        }
        let i = self.head;
        let mn = self.release(i);
        self.index.remove(&mn);
        Some(mn)
    }

    /// MNs tracked.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no MN is tracked.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether `mn` is tracked.
    pub fn contains(&self, mn: &str) -> bool {
        self.index.contains_key(mn)
    }

    /// Takes node `i` out of the list.
    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        match prev {
            NIL => self.head = next,
            p => self.nodes[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n].prev = prev,
        }
    }

    /// Puts node `i` (not in the list) at the newest end.
    fn push_back(&mut self, i: usize) {
        self.nodes[i].prev = self.tail;
        self.nodes[i].next = NIL;
        match self.tail {
            NIL => self.head = i,
            t => self.nodes[t].next = i,
        }
        self.tail = i;
    }

    /// Unlinks node `i` and frees its slot; returns its MN.
    fn release(&mut self, i: usize) -> String {
        self.unlink(i);
        self.free.push(i);
        std::mem::take(&mut self.nodes[i].mn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_first_and_touch_moves_to_the_back() {
        let mut r = Recency::default();
        assert!(r.touch("a"));
        assert!(r.touch("b"));
        assert!(r.touch("c"));
        assert!(!r.touch("a"), "already tracked");
        assert_eq!(r.len(), 3);
        assert_eq!(r.pop_oldest().as_deref(), Some("b"));
        assert!(r.remove("c"));
        assert!(!r.remove("c"));
        assert_eq!(r.pop_oldest().as_deref(), Some("a"));
        assert_eq!(r.pop_oldest(), None);
        assert!(r.is_empty());
    }

    /// Random touches, removals and pops against a plain list in touch order:
    /// the same answers, the same order, and the slab no larger than the most
    /// MNs tracked at once.
    #[test]
    fn behaves_as_a_list_in_touch_order() {
        let mut r = Recency::default();
        let mut model: Vec<String> = Vec::new();
        let mut most = 0;
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mn = format!("MN{}", (x >> 20) % 40);
            match x % 7 {
                0 => {
                    let want = model.iter().position(|m| *m == mn).map(|p| model.remove(p));
                    assert_eq!(r.remove(&mn), want.is_some());
                }
                1 => {
                    let want = (!model.is_empty()).then(|| model.remove(0));
                    assert_eq!(r.pop_oldest(), want);
                }
                2 => {
                    let had = model.iter().position(|m| *m == mn).map(|p| model.remove(p));
                    if had.is_some() {
                        model.push(mn.clone());
                    }
                    assert_eq!(r.refresh(&mn), had.is_some());
                }
                _ => {
                    let had = model.iter().position(|m| *m == mn).map(|p| model.remove(p));
                    model.push(mn.clone());
                    assert_eq!(r.touch(&mn), had.is_none());
                }
            }
            most = most.max(model.len());
            assert_eq!(r.len(), model.len());
            assert_eq!(r.contains(&mn), model.contains(&mn));
            assert!(r.nodes.len() <= most);
        }
        let mut rest = Vec::new();
        while let Some(mn) = r.pop_oldest() {
            rest.push(mn);
        }
        assert_eq!(rest, model);
    }
}
