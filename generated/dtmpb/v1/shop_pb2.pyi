from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OrderState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORDER_STATE_UNSPECIFIED: _ClassVar[OrderState]
    ORDER_STATE_PENDING: _ClassVar[OrderState]
    ORDER_STATE_CONFIRMED: _ClassVar[OrderState]
    ORDER_STATE_CANCELLED: _ClassVar[OrderState]
ORDER_STATE_UNSPECIFIED: OrderState
ORDER_STATE_PENDING: OrderState
ORDER_STATE_CONFIRMED: OrderState
ORDER_STATE_CANCELLED: OrderState

class StockLine(_message.Message):
    __slots__ = ("sku", "quantity")
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    sku: str
    quantity: int
    def __init__(self, sku: _Optional[str] = ..., quantity: _Optional[int] = ...) -> None: ...

class ReserveStock(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[StockLine]
    def __init__(self, lines: _Optional[_Iterable[_Union[StockLine, _Mapping]]] = ...) -> None: ...

class StockLevel(_message.Message):
    __slots__ = ("sku", "available", "reserved", "sold", "received")
    SKU_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    SOLD_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    sku: str
    available: int
    reserved: int
    sold: int
    received: int
    def __init__(self, sku: _Optional[str] = ..., available: _Optional[int] = ..., reserved: _Optional[int] = ..., sold: _Optional[int] = ..., received: _Optional[int] = ...) -> None: ...

class GetStockRequest(_message.Message):
    __slots__ = ("skus", "page_size", "page_token")
    SKUS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    skus: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, skus: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetStockResponse(_message.Message):
    __slots__ = ("levels", "next_page_token")
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    levels: _containers.RepeatedCompositeFieldContainer[StockLevel]
    next_page_token: str
    def __init__(self, levels: _Optional[_Iterable[_Union[StockLevel, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateOrder(_message.Message):
    __slots__ = ("order_id", "customer_id", "lines", "amount_cents")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    customer_id: str
    lines: _containers.RepeatedCompositeFieldContainer[StockLine]
    amount_cents: int
    def __init__(self, order_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[StockLine, _Mapping]]] = ..., amount_cents: _Optional[int] = ...) -> None: ...

class Order(_message.Message):
    __slots__ = ("order_id", "customer_id", "lines", "amount_cents", "state", "transaction_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    customer_id: str
    lines: _containers.RepeatedCompositeFieldContainer[StockLine]
    amount_cents: int
    state: OrderState
    transaction_id: str
    def __init__(self, order_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[StockLine, _Mapping]]] = ..., amount_cents: _Optional[int] = ..., state: _Optional[_Union[OrderState, str]] = ..., transaction_id: _Optional[str] = ...) -> None: ...

class ListOrdersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListOrdersResponse(_message.Message):
    __slots__ = ("orders", "next_page_token")
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    orders: _containers.RepeatedCompositeFieldContainer[Order]
    next_page_token: str
    def __init__(self, orders: _Optional[_Iterable[_Union[Order, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ChargePayment(_message.Message):
    __slots__ = ("account_id", "amount_cents", "order_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    amount_cents: int
    order_id: str
    def __init__(self, account_id: _Optional[str] = ..., amount_cents: _Optional[int] = ..., order_id: _Optional[str] = ...) -> None: ...

class Account(_message.Message):
    __slots__ = ("account_id", "balance_cents", "held_cents", "captured_cents", "initial_cents", "declines")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_CENTS_FIELD_NUMBER: _ClassVar[int]
    HELD_CENTS_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_CENTS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_CENTS_FIELD_NUMBER: _ClassVar[int]
    DECLINES_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    balance_cents: int
    held_cents: int
    captured_cents: int
    initial_cents: int
    declines: bool
    def __init__(self, account_id: _Optional[str] = ..., balance_cents: _Optional[int] = ..., held_cents: _Optional[int] = ..., captured_cents: _Optional[int] = ..., initial_cents: _Optional[int] = ..., declines: _Optional[bool] = ...) -> None: ...

class Capture(_message.Message):
    __slots__ = ("order_id", "account_id", "amount_cents", "transaction_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    account_id: str
    amount_cents: int
    transaction_id: str
    def __init__(self, order_id: _Optional[str] = ..., account_id: _Optional[str] = ..., amount_cents: _Optional[int] = ..., transaction_id: _Optional[str] = ...) -> None: ...

class ListAccountsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAccountsResponse(_message.Message):
    __slots__ = ("accounts", "captures", "next_page_token")
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    CAPTURES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    accounts: _containers.RepeatedCompositeFieldContainer[Account]
    captures: _containers.RepeatedCompositeFieldContainer[Capture]
    next_page_token: str
    def __init__(self, accounts: _Optional[_Iterable[_Union[Account, _Mapping]]] = ..., captures: _Optional[_Iterable[_Union[Capture, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SendNotification(_message.Message):
    __slots__ = ("order_id", "recipient", "body")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    recipient: str
    body: str
    def __init__(self, order_id: _Optional[str] = ..., recipient: _Optional[str] = ..., body: _Optional[str] = ...) -> None: ...

class SentNotification(_message.Message):
    __slots__ = ("order_id", "recipient", "body", "transaction_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    recipient: str
    body: str
    transaction_id: str
    def __init__(self, order_id: _Optional[str] = ..., recipient: _Optional[str] = ..., body: _Optional[str] = ..., transaction_id: _Optional[str] = ...) -> None: ...

class ListSentRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSentResponse(_message.Message):
    __slots__ = ("sent", "staged", "next_page_token")
    SENT_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sent: _containers.RepeatedCompositeFieldContainer[SentNotification]
    staged: int
    next_page_token: str
    def __init__(self, sent: _Optional[_Iterable[_Union[SentNotification, _Mapping]]] = ..., staged: _Optional[int] = ..., next_page_token: _Optional[str] = ...) -> None: ...
