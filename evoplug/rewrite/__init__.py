"""Compile time, part 2: a block's analysed graph -> the slow-path programs the runtime calls."""
