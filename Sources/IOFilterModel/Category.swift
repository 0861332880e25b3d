// FilterCategory, ThreadModel and ValueType are the header's, mirrored once in IOFilterABI.
@_exported import IOFilterABI
