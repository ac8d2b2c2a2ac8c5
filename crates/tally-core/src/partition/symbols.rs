//! Interned dims strings of one partition, so that a pane key is a few integers.
//!
//! Every distinct tenant, model, channel partner and region string of the open state
//! is stored once, as a [`Sym`]. A pane key of symbols is small and `Copy`: looking up
//! an event's pane hashes and compares a few integers in the table slot, instead of
//! following one pointer per dims string to separately allocated text.
//!
//! Symbols are an internal naming only: rows are ordered by the strings (see
//! [`Symbols::ranks`]) and built from them, so which number a string gets never shows.
//! Symbols no key refers to any more are freed by [`Symbols::retain`], which the
//! partition runs whenever the table doubled since the last collection, so the table
//! stays proportional to the open state, as the strings of the keys themselves were.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

/// An interned string: an index into [`Symbols`]. `Sym::MAX` is never a symbol (the
/// partition uses it for "no channel partner"): it would take 2³² − 1 distinct strings
/// in one partition's open state.
pub(super) type Sym = u32;

/// Fewest symbols at which a collection runs.
const MIN_COLLECT_AT: usize = 4096;

/// A string table with reusable slots.
#[derive(Debug, Clone)]
pub(super) struct Symbols {
    /// Text → symbol. The hasher is foldhash with a per-process random seed: the table
    /// is only probed, never iterated in an order that matters.
    ids: HashMap<Arc<str>, Sym, foldhash::fast::RandomState>,
    /// Symbol → text; `None` for a free slot. Shares its allocations with `ids`.
    texts: Vec<Option<Arc<str>>>,
    /// Free slots of `texts`.
    free: Vec<Sym>,
    /// Symbol count at which the owner should collect.
    collect_at: usize,
}

impl Default for Symbols {
    fn default() -> Symbols {
        Symbols {
            ids: HashMap::default(),
            texts: Vec::new(),
            free: Vec::new(),
            collect_at: MIN_COLLECT_AT,
        }
    }
}

impl Symbols {
    /// The symbol of `text`, if it is interned.
    #[inline]
    pub(super) fn get(&self, text: &str) -> Option<Sym> {
        self.ids.get(text).copied()
    }

    /// The symbol of `text`, interning it if needed.
    pub(super) fn intern(&mut self, text: &str) -> Sym {
        if let Some(&sym) = self.ids.get(text) {
            return sym;
        }
        let shared: Arc<str> = Arc::from(text);
        let sym = match self.free.pop() {
            Some(sym) => {
                if let Some(slot) = self.texts.get_mut(sym as usize) {
                    *slot = Some(Arc::clone(&shared));
                }
                sym
            }
            None => {
                let sym = Sym::try_from(self.texts.len()).unwrap_or(Sym::MAX);
                self.texts.push(Some(Arc::clone(&shared)));
                sym
            }
        };
        self.ids.insert(shared, sym);
        sym
    }

    /// The text of an interned symbol (empty for a symbol that is not interned, which
    /// no key holds).
    #[inline]
    pub(super) fn text(&self, sym: Sym) -> &str {
        self.texts
            .get(sym as usize)
            .and_then(Option::as_deref)
            .unwrap_or("")
    }

    /// Interned symbols.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the owner should collect now ([`Self::retain`]).
    #[inline]
    pub(super) fn collection_due(&self) -> bool {
        self.ids.len() >= self.collect_at
    }

    /// Frees every symbol not in `live`, and sets the next collection at twice the
    /// symbols left (at least [`MIN_COLLECT_AT`]).
    pub(super) fn retain(&mut self, live: impl IntoIterator<Item = Sym>) {
        let mut keep = vec![false; self.texts.len()];
        for sym in live {
            if let Some(flag) = keep.get_mut(sym as usize) {
                *flag = true;
            }
        }
        for (index, (slot, keep)) in self.texts.iter_mut().zip(keep).enumerate() {
            if keep {
                continue;
            }
            if let Some(text) = slot.take() {
                self.ids.remove(&text);
                self.free.push(Sym::try_from(index).unwrap_or(Sym::MAX));
            }
        }
        self.collect_at = (self.ids.len() * 2).max(MIN_COLLECT_AT);
    }

    /// The rank of every symbol's text in byte order, indexed by symbol: comparing
    /// ranks compares the texts (interned texts are distinct). Free slots rank 0.
    pub(super) fn ranks(&self) -> Vec<u32> {
        let mut order: Vec<(&str, Sym)> = self
            .texts
            .iter()
            .enumerate()
            .filter_map(|(index, text)| {
                let sym = Sym::try_from(index).ok()?;
                Some((text.as_deref()?, sym))
            })
            .collect();
        order.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut ranks = vec![0; self.texts.len()];
        for (rank, (_, sym)) in order.into_iter().enumerate() {
            if let Some(slot) = ranks.get_mut(sym as usize) {
                *slot = u32::try_from(rank).unwrap_or(u32::MAX);
            }
        }
        ranks
    }

    /// Estimated heap bytes: the hash table at its bucket count, the slot and free
    /// vectors, and each text's shared allocation (two reference counts and the bytes).
    pub(super) fn approx_bytes(&self) -> usize {
        let slot = size_of::<(Arc<str>, Sym)>() + 1;
        let mut bytes = super::hash_buckets_for_capacity(self.ids.capacity()) * slot
            + self.texts.capacity() * size_of::<Option<Arc<str>>>()
            + self.free.capacity() * size_of::<Sym>();
        for text in self.ids.keys() {
            bytes += super::allocation_bytes(2 * size_of::<usize>() + text.len());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_once_frees_unreferenced_symbols_and_reuses_their_slots() {
        let mut symbols = Symbols::default();
        let a = symbols.intern("a");
        let b = symbols.intern("b");
        assert_eq!(symbols.intern("a"), a);
        assert_ne!(a, b);
        assert_eq!(symbols.get("b"), Some(b));
        assert_eq!(symbols.text(b), "b");
        symbols.retain([b]);
        assert_eq!(symbols.get("a"), None);
        assert_eq!(symbols.len(), 1);
        let c = symbols.intern("c");
        assert_eq!(c, a, "the freed slot is reused");
        assert_eq!(symbols.text(c), "c");
        assert_eq!(symbols.text(b), "b");
    }

    #[test]
    fn ranks_follow_byte_order() {
        let mut symbols = Symbols::default();
        let texts = ["m", "a", "", "ab", "é", "Z", "b"];
        let syms: Vec<Sym> = texts.iter().map(|text| symbols.intern(text)).collect();
        let ranks = symbols.ranks();
        for (left, &left_sym) in texts.iter().zip(&syms) {
            for (right, &right_sym) in texts.iter().zip(&syms) {
                assert_eq!(
                    left.cmp(right),
                    ranks[left_sym as usize].cmp(&ranks[right_sym as usize]),
                    "{left:?} vs {right:?}"
                );
            }
        }
    }
}
