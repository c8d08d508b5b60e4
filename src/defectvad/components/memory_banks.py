# src/defectvad/components/memory_banks.py
def stack_and_clear(tensors):
    # torch.vstack of a list, emptying the list as it goes: the stacked copy and the list never both hold everything
    if not tensors:
        raise ValueError("nothing to stack")
    first = tensors[0]
    stacked = first.new_empty((sum(len(tensor) for tensor in tensors), *first.shape[1:]))
    start = 0
    while tensors:
        tensor = tensors.pop(0)
        stacked[start:start + len(tensor)] = tensor
        start += len(tensor)
    return stacked
