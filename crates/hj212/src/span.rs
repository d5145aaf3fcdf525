//! Byte ranges into a data segment.
//!
//! Its own module, below `header`, `cp` and `frame`, so that the grammar
//! modules and the frame that holds their results all depend on it and not on
//! each other.

/// A byte range within a frame's (plaintext) data segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// Builds a span; frames are capped far below 4 GiB.
    pub fn new(start: usize, end: usize) -> Span {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }
    /// Start offset.
    pub fn start(self) -> usize {
        self.start as usize
    }
    /// End offset (exclusive).
    pub fn end(self) -> usize {
        self.end as usize
    }
    /// As a range for slicing.
    pub fn range(self) -> std::ops::Range<usize> {
        self.start()..self.end()
    }
}
