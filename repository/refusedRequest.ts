/** A request refused for the caller's own fault: bad input, nothing of that name, or a name already taken. */
export class RefusedRequest extends Error {
  constructor(
    readonly code: 'invalid' | 'not-found' | 'conflict',
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = new.target.name;
  }
}
